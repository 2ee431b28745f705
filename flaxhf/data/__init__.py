"""Data: raw sources (the one `datasets`/TFDS wrapper), static-shape batching, task preparation."""

from flaxhf.data.batching import (DEFAULT_BUCKETS, Examples, bucket_length, eval_batches,
                                  eval_steps, steps_per_epoch, train_batches)
from flaxhf.data.sources import DataError, load_splits
from flaxhf.data.text_classification import TaskData, prepare_text_classification
