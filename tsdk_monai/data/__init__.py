"""Datalists, grouped few-label splits, ``prepare``, the transfer set and the embedded demo phantoms."""

from tsdk_monai.data.datalist import LABELLED_SPLITS, SPLITS, load_datalist, load_split, num_classes_of
from tsdk_monai.data.io import check_label_values, image_stem, read_array
from tsdk_monai.data.phantom import make_phantom, write_demo_data
from tsdk_monai.data.prepare import group_of, prepare, split_groups
from tsdk_monai.data.subset import labelled_pool_size, subset_datalist
from tsdk_monai.data.transfer import as_bool, build_transfer_set

__all__ = [
    "SPLITS", "LABELLED_SPLITS", "load_datalist", "load_split", "num_classes_of", "check_label_values",
    "image_stem", "read_array", "make_phantom", "write_demo_data", "group_of", "prepare", "split_groups",
    "subset_datalist", "labelled_pool_size", "as_bool", "build_transfer_set",
]
