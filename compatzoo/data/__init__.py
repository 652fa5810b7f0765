"""Datasets, the embedded synthetic benchmark, augmentation and old/new allocations.

``DATASETS`` and ``ALLOCATIONS`` map registry names to functions that declare their
``Params``: a dataset takes its params and returns :class:`RetrievalData`; an allocation
takes its params, ``labels=`` (the training labels) and ``seed=`` and returns
:class:`Allocation`.
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
from compatzoo.data.datasets import LabeledImages, RetrievalData, SubsetImages, TensorImages
from compatzoo.data.image_folder import FileImages, ImageFolderParams, make_image_folder
from compatzoo.data.synthetic import SyntheticParams, make_synthetic

DATASETS = {"synthetic": make_synthetic, "image-folder": make_image_folder,
            "cifar100": make_cifar100}

__all__ = [
    "ALLOCATIONS",
    "DATASETS",
    "Allocation",
    "AugmentParams",
    "BatchAugment",
    "Cifar100Params",
    "ExtendedParams",
    "FileImages",
    "ImageFolderParams",
    "LabeledImages",
    "OpenParams",
    "RetrievalData",
    "SequentialParams",
    "SubsetImages",
    "SyntheticParams",
    "TensorImages",
    "extended_class",
    "extended_data",
    "make_cifar100",
    "make_image_folder",
    "make_synthetic",
    "open_class",
    "open_data",
    "sequential",
]
