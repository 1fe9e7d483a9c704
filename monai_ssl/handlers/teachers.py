"""Teacher networks: an EMA teacher that follows the student and a frozen (static) teacher."""

from __future__ import annotations

import copy

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch import nn

__all__ = ["EMATeacher", "make_teacher", "freeze"]


def freeze(network: nn.Module) -> nn.Module:
    """Put ``network`` in eval mode with gradients off; return it (a static teacher)."""
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def make_teacher(student: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
    """Return a frozen copy of ``student`` (or load the student's weights into ``teacher``)."""
    if teacher is None:
        teacher = copy.deepcopy(student)
    else:
        teacher.load_state_dict(student.state_dict())
    return freeze(teacher)


class EMATeacher:
    """Exponential moving average of a student's parameters **and** buffers, as an ignite handler.

    After every optimiser step (``IterationEvents.MODEL_COMPLETED``)::

        alpha = min(1 - 1 / (step + 1), decay)      # warm-up as in the mean-teacher reference code
        theta_teacher = alpha * theta_teacher + (1 - alpha) * theta_student

    Floating-point buffers (BatchNorm running statistics) are averaged the same way; integer
    buffers (``num_batches_tracked``) are copied. The teacher never receives gradients.

    Args:
        teacher: the teacher network (initialised from the student on construction when
            ``init_from_student``).
        student: the trained network.
        decay: the EMA decay alpha (0.99 in mean teacher; 0.995 in the dual-teacher paper).
        warmup: use ``min(1 - 1/(step+1), decay)`` so early steps follow the student closely.
        init_from_student: copy the student's weights into the teacher at construction.
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, decay: float = 0.99, warmup: bool = True, init_from_student: bool = True
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.teacher = teacher
        self.student = student
        self.decay = decay
        self.warmup = warmup
        if init_from_student:
            teacher.load_state_dict(_unwrap(student).state_dict())
        freeze(teacher)

    def attach(self, engine: Engine) -> None:
        """Update the teacher after each optimiser step of ``engine``."""
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def alpha(self, step: int) -> float:
        """The EMA weight of the old teacher at global step ``step`` (1-based)."""
        return min(1.0 - 1.0 / (step + 1), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the teacher one EMA step towards the student."""
        alpha = self.alpha(step)
        student = _unwrap(self.student)
        t_params = dict(self.teacher.named_parameters())
        t_buffers = dict(self.teacher.named_buffers())
        pairs = [(t_params[n], p) for n, p in student.named_parameters()]
        pairs += [(t_buffers[n], b) for n, b in student.named_buffers() if b.is_floating_point()]
        teacher_vals, student_vals = zip(*pairs)
        torch._foreach_lerp_(list(teacher_vals), list(student_vals), 1.0 - alpha)  # one fused pass, as AveragedModel
        for name, s_buf in student.named_buffers():
            if not s_buf.is_floating_point():
                t_buffers[name].copy_(s_buf)

    def __call__(self, engine: Engine) -> None:
        self.update(engine.state.iteration)


def _unwrap(network: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel wrappers."""
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network
