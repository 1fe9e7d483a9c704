"""Data layer: datalists, synthetic datasets, readers and case-checking transforms."""

from monai_ssl.data.datalist import (
    DatalistError,
    case_id_from_path,
    load_datalist,
    make_protocol_split,
    save_datalist,
    scan_dataset_dir,
)
from monai_ssl.data.readers import H5VolumeReader, read_h5_volume
from monai_ssl.data.synthetic import SYNTHETIC_KINDS, default_cache_dir, synthetic_dataset
from monai_ssl.data.transforms import BinarizeLabeld, CaseError, SqueezeSpatiald, ToGrayscaled, ValidateCased, case_name

__all__ = [
    "BinarizeLabeld",
    "CaseError",
    "DatalistError",
    "H5VolumeReader",
    "SYNTHETIC_KINDS",
    "SqueezeSpatiald",
    "ToGrayscaled",
    "ValidateCased",
    "case_id_from_path",
    "case_name",
    "default_cache_dir",
    "load_datalist",
    "make_protocol_split",
    "read_h5_volume",
    "save_datalist",
    "scan_dataset_dir",
    "synthetic_dataset",
]
