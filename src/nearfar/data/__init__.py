"""Data sources: bundled real data, image folders, CSV/JSONL manifests, and fast batches.

Everything loads into an in-memory :class:`ImageDataset` (uint8 images, labels,
aligned per-item metadata, a content hash for the model card)::

    from nearfar.data import load_dataset, train_test_split, BatchLoader

    ds = load_dataset("mnist5k")                     # or "digits", or a folder/manifest path
    train, test = train_test_split(ds, seed=0)       # 4,000 / 1,000, stratified
    for batch in BatchLoader(train, 256, seed=0):    # batch.images float (256, 1, 28, 28)
        ...
"""

from nearfar.data.batches import (
    Batch,
    BatchLoader,
    batch_indices,
    batches,
    num_batches,
    take,
)
from nearfar.data.bundled import (
    available_datasets,
    load_dataset,
    load_digits,
    load_mnist5k,
    register_dataset,
)
from nearfar.data.dataset import ImageDataset, to_float
from nearfar.data.folders import load_image_folder
from nearfar.data.images import IMAGE_SUFFIXES, ImageReadError
from nearfar.data.manifest import load_manifest
from nearfar.data.split import split_indices, train_test_split

__all__ = [
    "IMAGE_SUFFIXES",
    "Batch",
    "BatchLoader",
    "ImageDataset",
    "ImageReadError",
    "available_datasets",
    "batch_indices",
    "batches",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_manifest",
    "load_mnist5k",
    "num_batches",
    "register_dataset",
    "split_indices",
    "take",
    "to_float",
    "train_test_split",
]

# synthetic time series (issue 4); importing registers load_dataset("signals")
from nearfar.data.signals import SIGNAL_CLASSES, SignalDataset, load_signals  # noqa: E402

__all__ += ["SIGNAL_CLASSES", "SignalDataset", "load_signals"]

# false negatives (issue 4): batches without repeated groups, exclusion masks
from nearfar.data.samplers import (  # noqa: E402
    DistinctGroupBatches,
    same_group_mask,
    two_view_exclusion,
)

__all__ += ["DistinctGroupBatches", "same_group_mask", "two_view_exclusion"]

# captioned images (issue 4); importing registers load_dataset("mnist5k_captions", "shapes")
from nearfar.data.captions import (  # noqa: E402
    load_mnist5k_captions,
    prompt_templates,
    register_prompts,
    with_captions,
)
from nearfar.data.shapes import load_shapes, predefined_split  # noqa: E402

__all__ += ["load_mnist5k_captions", "load_shapes", "predefined_split", "prompt_templates",
            "register_prompts", "with_captions"]

# text pairs for dual encoders (issue 4): the stdlib (docstring, code) corpus, JSONL/CSV
# pairs, group splits; registers the dataset name "stdlib_code"
from nearfar.data.text_pairs import (  # noqa: E402
    TextPairDataset,
    TextPairError,
    group_split,
    load_text_pairs,
    stdlib_code_pairs,
)

register_dataset("stdlib_code", stdlib_code_pairs)
__all__ += ["TextPairDataset", "TextPairError", "group_split", "load_text_pairs",
            "stdlib_code_pairs"]

# tar shards (the webdataset format) for data larger than memory: write, read fully, stream
from nearfar.data.shards import (  # noqa: E402
    ShardReadError,
    ShardStream,
    expand_braces,
    load_shards,
    shard_paths,
    write_shards,
)

__all__ += ["ShardReadError", "ShardStream", "expand_braces", "load_shards", "shard_paths",
            "write_shards"]
