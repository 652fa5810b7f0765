"""Datasets, the embedded synthetic benchmark, augmentation and old/new allocations.

``DATASETS`` and ``ALLOCATIONS`` map registry names to functions that declare their
``Params``: a dataset takes its params and returns :class:`RetrievalData`; an allocation
takes its params, ``labels=`` (the training labels) and ``seed=`` and returns
:class:`Allocation`.

A dataset may also state, from its params alone, what ``compatzoo run --dry-run`` needs to
build every model at full size without reading a file: ``num_classes_of(params)``, the
class count of its training set (None when only the files tell; the user then gives
``--classes``), and ``image_size_of(params)``, the side of its square images (default:
``params.image_size``).
"""

from compatzoo.data.allocations import (
    ALLOCATIONS,
    Allocation,
    ExtendedParams,
    OpenParams,
    SequentialParams,
    extended_class,
    extended_data,
    open_class,
    open_data,
    sequential,
)
from compatzoo.data.augment import AugmentParams, BatchAugment
from compatzoo.data.cifar100 import Cifar100Params, make_cifar100
from compatzoo.data.datasets import (
    LabeledImages,
    RetrievalData,
    RevisitedTruth,
    SubsetImages,
    TensorImages,
)
from compatzoo.data.gldv2 import GldV2Params, make_gldv2
from compatzoo.data.ijbc import IJBCMeta, ijbc_verification, load_ijbc
from compatzoo.data.image_folder import FileImages, ImageFolderParams, make_image_folder
from compatzoo.data.ms1m import MS1MParams, make_ms1m
from compatzoo.data.revisited_data import RevisitedEval, RevisitedParams, make_revisited
from compatzoo.data.synthetic import SyntheticParams, make_synthetic
from compatzoo.data.webdataset_shards import WebDatasetParams, make_webdataset

DATASETS = {"synthetic": make_synthetic, "image-folder": make_image_folder,
            "cifar100": make_cifar100, "ms1m": make_ms1m,
            "gldv2": make_gldv2, "revisited": make_revisited, "webdataset": make_webdataset}

__all__ = [
    "ALLOCATIONS",
    "DATASETS",
    "Allocation",
    "AugmentParams",
    "BatchAugment",
    "Cifar100Params",
    "ExtendedParams",
    "FileImages",
    "GldV2Params",
    "IJBCMeta",
    "ImageFolderParams",
    "LabeledImages",
    "MS1MParams",
    "OpenParams",
    "RetrievalData",
    "RevisitedEval",
    "RevisitedParams",
    "RevisitedTruth",
    "SequentialParams",
    "SubsetImages",
    "SyntheticParams",
    "TensorImages",
    "WebDatasetParams",
    "extended_class",
    "extended_data",
    "ijbc_verification",
    "load_ijbc",
    "make_cifar100",
    "make_gldv2",
    "make_image_folder",
    "make_ms1m",
    "make_revisited",
    "make_synthetic",
    "make_webdataset",
    "open_class",
    "open_data",
    "sequential",
]
