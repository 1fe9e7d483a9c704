"""Command-line switches take effect: the coercers, a lint of every bundle config, and real CLI runs.

``python -m monai.bundle run ... --amp false`` hands the config the string ``'false'`` (python-fire
types only ``False``/``0``/``1e-3``/lists), so every bundle routes its boolean and numeric ids
through ``monai_ssl.bundle.settings`` in a ``settings`` section, resolved first at start-up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from monai.bundle import ConfigParser

from bundle_utils import REPO_ROOT, config_path, error_messages, tiny_overrides
from monai_ssl.bundle import as_bool, as_float, as_int, as_size

#: every bundle in bundles/ (a new bundle is linted as soon as its configs exist)
BUNDLES = sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
#: every way a bundle's configs are combined (evaluate / multi_gpu_train are merged on train.json)
COMBINATIONS = [["train.json"], ["train.json", "evaluate.json"], ["train.json", "multi_gpu_train.json"],
                ["inference.json"]]
CASES = [(b, c) for b in BUNDLES for c in COMBINATIONS]
LOG_SETTINGS = "$monai_ssl.bundle.log_settings(@settings)"
#: top-level ``null`` settings that are strings, not booleans or numbers (so not coerced)
STRING_NULLS = {"consistency"}


# ---------------------------------------------------------------------------------------------
# (a) the coercers


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("true", True), ("false", False), ("True", True), ("False", False),
    ("TRUE", True), (" no ", False), ("yes", True), (1, True), (0, False), ("1", True), ("0", False),
])
def test_as_bool_accepts_the_documented_spellings(value: Any, expected: bool) -> None:
    assert as_bool(value, "amp") is expected


@pytest.mark.parametrize("value", ["maybe", "abc", "", 2, -1, 0.5, 1.0, None, "none", [True]])
def test_as_bool_refuses_anything_else_naming_the_id_and_value(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        as_bool(value, "use_static_teacher")
    message = str(info.value)
    assert "'use_static_teacher'" in message and repr(value) in message
    assert "true/false" in message and "1/0" in message  # says what is accepted


def test_optional_settings_accept_null() -> None:
    for spelling in (None, "none", "None", "null", "NULL"):
        assert as_bool(spelling, "use_cps", optional=True) is None
        assert as_int(spelling, "epoch_length", optional=True) is None
        assert as_float(spelling, "entropy_percentile", optional=True) is None
        assert as_size(spelling, "sw_roi_size", ndim=3, optional=True) is None
    assert as_bool("false", "use_cps", optional=True) is False
    with pytest.raises(ValueError, match="null"):
        as_bool("maybe", "use_cps", optional=True)


@pytest.mark.parametrize("value, expected", [(4, 4), ("4", 4), (" 12 ", 12), (4.0, 4), (1e3, 1000), ("1e3", 1000)])
def test_as_int_accepts_integers(value: Any, expected: int) -> None:
    result = as_int(value, "batch_size", minimum=1)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("value", ["abc", "4.5", 4.5, True, False, None, [4], "nan", 0, -3])
def test_as_int_refuses_non_integers_and_out_of_range(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        as_int(value, "batch_size", minimum=1)
    assert "'batch_size'" in str(info.value) and repr(value) in str(info.value)
    assert ">= 1" in str(info.value)


@pytest.mark.parametrize("value, expected", [(1e-3, 0.001), ("1e-3", 0.001), (1, 1.0), ("0.5", 0.5), (0, 0.0)])
def test_as_float_accepts_numbers(value: Any, expected: float) -> None:
    result = as_float(value, "learning_rate", minimum=0)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", ["abc", "nan", "inf", float("nan"), float("inf"), True, None, -0.1, 1.5, "[1]"])
def test_as_float_refuses_non_numbers_and_out_of_range(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        as_float(value, "ema_decay", minimum=0, maximum=1)
    assert "'ema_decay'" in str(info.value) and "[0, 1]" in str(info.value)


@pytest.mark.parametrize("value, ndim, expected", [
    (128, None, 128), ("128", None, 128), ([128, 96], None, [128, 96]), ("[128,96]", None, [128, 96]),
    ("128,96", None, [128, 96]), ((128, 96), None, [128, 96]), (["64", 32.0], None, [64, 32]),
    (96, 3, [96, 96, 96]), ("[112, 112, 80]", 3, [112, 112, 80]),
])
def test_as_size_accepts_ints_and_lists(value: Any, ndim: int | None, expected: Any) -> None:
    assert as_size(value, "spatial_size", ndim=ndim) == expected


@pytest.mark.parametrize("value, ndim", [("abc", None), ("[128, abc]", None), ([], None), (0, None), ("-5", None),
                                         ([1.5, 2], None), (True, None), (None, None), ([96, 96], 3), ("__import__('os')", None)])
def test_as_size_refuses_bad_sizes_naming_the_id(value: Any, ndim: int | None) -> None:
    with pytest.raises(ValueError) as info:
        as_size(value, "spatial_size", ndim=ndim)
    assert "'spatial_size'" in str(info.value) and repr(value) in str(info.value)


# ---------------------------------------------------------------------------------------------
# (b) lint: every boolean / numeric top-level setting of every config goes through `settings`

_REF = re.compile(r"(?<![\w#@])[@%]([A-Za-z_]\w*)")


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a raw config, with its id path (``train#trainer#amp``)."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}#{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}#{i}" if path else str(i))


def _is_plain_setting(value: Any) -> bool:
    """A literal boolean, number, ``null`` or list of numbers: a value a user switches from the CLI."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def settings_problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with how ``config`` (raw, merged) handles its user-facing settings."""
    settings = config.get("settings")
    if not isinstance(settings, dict):
        return ["no 'settings' section"]
    problems = []
    for key, value in config.items():
        if key != "settings" and _is_plain_setting(value) and key not in settings and key not in STRING_NULLS:
            problems.append(f"top-level setting '{key}' ({value!r}) is not coerced in 'settings'")
    for sid, entry in settings.items():
        pattern = rf"\$monai_ssl\.bundle\.as_(bool|int|float|size|weights|prompts)\(@{sid}, '{sid}'(, \w+=[\w.]+)*\)"
        if sid not in config:
            problems.append(f"settings#{sid} coerces an id that the config does not define")
        if not (isinstance(entry, str) and re.fullmatch(pattern, entry)):
            problems.append(f"settings#{sid} is not a monai_ssl.bundle.as_*(@{sid}, '{sid}', ...) call: {entry!r}")
    for path, text in _strings(config):
        if path.startswith("settings#"):
            continue
        for match in _REF.finditer(text):
            if match.group(1) in settings:
                problems.append(f"{path}: raw reference {match.group(0)} (use @settings#{match.group(1)})")
    initialize = config.get("initialize", [])
    if LOG_SETTINGS not in initialize:
        problems.append(f"initialize does not resolve the settings ({LOG_SETTINGS!r})")
    else:
        for k, item in enumerate(initialize[: initialize.index(LOG_SETTINGS)]):
            refs = {m.group(0) for m in _REF.finditer(item) if m.group(1) != "settings"}
            if refs:
                problems.append(f"initialize#{k} runs before the settings are checked and uses {sorted(refs)}")
    return problems


def _raw_config(bundle: str, configs: list[str]) -> dict[str, Any]:
    return ConfigParser.load_config_files([config_path(bundle, c) for c in configs])


@pytest.mark.parametrize("bundle, configs", CASES)
def test_every_setting_is_coerced_once_and_read_through_settings(bundle: str, configs: list[str]) -> None:
    assert settings_problems(_raw_config(bundle, configs)) == []


def test_the_lint_catches_a_raw_reference_and_an_uncoerced_setting() -> None:
    config = _raw_config("supervised", ["train.json"])
    config["train"]["trainer"]["amp"] = "@amp"
    config["validate"]["evaluator"]["amp"] = "$@amp and @device.type == 'cuda'"
    config["flag_nobody_coerces"] = False
    config["initialize"].insert(0, "$print(@train#dataset)")
    problems = settings_problems(config)
    assert "train#trainer#amp: raw reference @amp (use @settings#amp)" in problems
    assert "validate#evaluator#amp: raw reference @amp (use @settings#amp)" in problems
    assert "top-level setting 'flag_nobody_coerces' (False) is not coerced in 'settings'" in problems
    assert any(p.startswith("initialize#0 runs before the settings") for p in problems)
    config["settings"]["amp"] = "$monai_ssl.bundle.as_bool(@batch_size, 'amp')"
    assert any(p.startswith("settings#amp is not") for p in settings_problems(config))


# ---------------------------------------------------------------------------------------------
# every setting, in process: words mean what they say, garbage stops the start-up naming the id


def _parser(bundle: str, configs: list[str], **override: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([config_path(bundle, c) for c in configs])
    parser.update(override)
    return parser


def _bool_ids(raw: dict[str, Any]) -> list[str]:
    return [sid for sid, entry in raw["settings"].items() if ".as_bool(" in entry]


@pytest.mark.parametrize("bundle, configs", CASES)
def test_every_boolean_setting_means_the_word_given(bundle: str, configs: list[str]) -> None:
    ids = _bool_ids(_raw_config(bundle, configs))
    assert ids or configs == ["inference.json"]
    for words, expected in ((("false", "False", "0", 0, "no"), False), (("true", "True", "1", 1, "YES"), True)):
        for word in words:
            parser = _parser(bundle, configs, **{sid: word for sid in ids})
            got = {sid: parser.get_parsed_content(f"settings#{sid}") for sid in ids}
            assert got == dict.fromkeys(ids, expected), (word, got)


#: a value that is wrong for the setting where "abc" is a legitimate one (any text is a prompt)
BAD_VALUES = {"prompts": "[1, 2]"}


@pytest.mark.parametrize("bundle, configs", CASES)
def test_a_bad_value_of_any_setting_stops_start_up_naming_it(bundle: str, configs: list[str]) -> None:
    raw = _raw_config(bundle, configs)
    start = raw["initialize"].index(LOG_SETTINGS)
    for sid in raw["settings"]:
        bad = BAD_VALUES.get(sid, "abc")
        parser = _parser(bundle, configs, **{sid: bad})
        # the start-up item itself; multi_gpu_train's needs a process group, so check the setting
        target = f"settings#{sid}" if "multi_gpu_train.json" in configs else f"initialize#{start}"
        with pytest.raises(Exception) as info:
            parser.get_parsed_content(target)
        assert any(f"setting '{sid}': got {bad!r}" in m for m in error_messages(info.value)), (sid, target)


# ---------------------------------------------------------------------------------------------
# (c) the real command line


def _cli(bundle: str, configs: list[str | Path], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` as a user types it; stdout and stderr together."""
    files = [str(c) if isinstance(c, Path) else config_path(bundle, c) for c in configs]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]",
        "--meta_file", config_path(bundle, "metadata.json"),
        "--logging_file", config_path(bundle, "logging.conf"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def _tiny_args(bundle_root: Path, **extra: Any) -> list[str]:
    return [f"--{k}={v}" for k, v in tiny_overrides(bundle_root, **extra).items()]


#: a run_id that trains one iteration and prints the dtype of every training forward's output
PROBE = {
    "probe": [
        "$print('PROBE trainer.amp', repr(@train#trainer.amp), flush=True)",
        "$@network.register_forward_hook(lambda module, args, out: "
        "print('PROBE forward', out.dtype, flush=True) if module.training else None)",
        "$@train#trainer.run()",
    ],
    "probe_finalize": [],
}


def _amp_probe(tmp_path: Path, value: str) -> tuple[set[str], str]:
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    result = _cli("supervised", ["train.json", probe], *_tiny_args(tmp_path / "bundle", epoch_length=1),
                  f"--amp={value}", "--run_id=probe", "--final_id=probe_finalize")
    assert result.returncode == 0, result.stdout[-4000:]
    dtypes = set(re.findall(r"^PROBE forward (\S+)$", result.stdout, re.M))
    return dtypes, result.stdout


@pytest.mark.parametrize("value, dtype", [("false", "torch.float32"), ("true", "torch.bfloat16")])
def test_cli_amp_switch_decides_the_training_precision(value: str, dtype: str, tmp_path: Path) -> None:
    dtypes, out = _amp_probe(tmp_path, value)
    assert dtypes == {dtype}, out[-3000:]
    assert f"PROBE trainer.amp {value == 'true'}" in out
    assert f"amp={value == 'true'}" in out  # the start-up settings line


@pytest.mark.slow
@pytest.mark.parametrize("value, dtype", [("0", "torch.float32"), ("False", "torch.float32"), ("1", "torch.bfloat16")])
def test_cli_amp_switch_typed_spellings(value: str, dtype: str, tmp_path: Path) -> None:
    dtypes, out = _amp_probe(tmp_path, value)
    assert dtypes == {dtype}, out[-3000:]


@pytest.mark.parametrize("bundle, configs, switch, sid, output", [
    ("supervised", ["train.json"], "--amp=maybe", "amp", "runs"),
    ("supervised", ["train.json"], "--spatial_size=abc", "spatial_size", "runs"),
    ("dual_teacher", ["train.json"], "--use_static_teacher=maybe", "use_static_teacher", "runs"),
    pytest.param("dual_network_3d", ["inference.json"], "--amp=maybe", "amp", "inference", marks=pytest.mark.slow),
])
def test_cli_bad_value_stops_at_start_up(bundle: str, configs: list[str], switch: str, sid: str, output: str,
                                         tmp_path: Path) -> None:
    # tiny settings, so that a run which does not stop (the fault) ends in seconds and fails below
    stage = {"stwp_max_epochs": 1} if bundle == "dual_teacher" else {}
    tiny = _tiny_args(tmp_path, epoch_length=1, **stage) if configs == ["train.json"] else []
    result = _cli(bundle, configs, *tiny, f"--bundle_root={tmp_path}", switch, timeout=300)
    value = switch.split("=", 1)[1]
    assert result.returncode != 0, "the run went on with a bad value"
    assert f"error: setting '{sid}': got '{value}' (str); accepted:" in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, "a bad setting prints one line, not a traceback"
    # stopped at the first item of `initialize`: not even the output folder was made, nothing loaded
    assert not (tmp_path / output).exists()


@pytest.mark.slow
def test_cli_use_static_teacher_false_skips_appg(tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    appg_dir = tmp_path / "appg"
    result = _cli("dual_teacher", ["train.json"], *_tiny_args(root, epoch_length=1),
                  "--use_static_teacher=false", f"--appg_dir={appg_dir}", "--stwp_max_epochs=1")
    assert result.returncode == 0, result.stdout[-4000:]
    assert not appg_dir.exists(), "APPG ran although --use_static_teacher=false"
    assert not (root / "runs" / "stwp").exists() and not (root / "models" / "static_teacher.pt").exists()
    assert (root / "models" / "model.pt").is_file()
    assert "use_static_teacher=False" in result.stdout


def test_as_weights_accepts_null_pretrained_or_an_existing_file(tmp_path: Path) -> None:
    from monai_ssl.bundle import as_weights

    weights = tmp_path / "resnet34.pth"
    weights.write_bytes(b"x")
    assert as_weights(None, "encoder_weights") is None
    assert as_weights("null", "encoder_weights") is None
    assert as_weights("pretrained", "encoder_weights") == "pretrained"
    assert as_weights(str(weights), "encoder_weights") == str(weights)
    for bad in (str(tmp_path / "absent.pth"), "imagenet", 3, True):
        with pytest.raises(ValueError, match=r"setting 'encoder_weights': got .*nothing|setting 'encoder_weights': got"):
            as_weights(bad, "encoder_weights")


def test_as_prompts_gives_a_list_or_none() -> None:
    from monai_ssl.bundle import as_prompts

    assert as_prompts(None, "prompts") is None and as_prompts("null", "prompts") is None
    assert as_prompts("dark oval", "prompts") == ["dark oval"]
    assert as_prompts("['dark oval', 'bright round']", "prompts") == ["dark oval", "bright round"]
    assert as_prompts(["dark oval"], "prompts") == ["dark oval"]
    for bad in ("", [], ["ok", ""], 3, "[1, 2]", "[unclosed"):
        with pytest.raises(ValueError, match="setting 'prompts': got"):
            as_prompts(bad, "prompts")
