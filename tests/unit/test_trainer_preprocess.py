"""Labels for GPT-2 style tokenizers (bos = eos = pad) and the batch order used for resuming."""

from __future__ import annotations

import torch

from captionfleet.trainer.preprocess import IGNORE_INDEX, batch_indices, encode_captions, hash_seed
from captionfleet.trainer.scratch import train_tokenizer

CAPTIONS = ["a red circle", "a big blue square above a small red star", "two green stars"]


def test_labels_end_with_one_eos_then_ignored_padding() -> None:
    tokenizer = train_tokenizer(CAPTIONS * 5, 400)
    eos = tokenizer.eos_token_id
    labels = encode_captions(tokenizer, CAPTIONS, max_tokens=32)
    assert labels.shape[0] == 3
    for row, caption in zip(labels.tolist(), CAPTIONS, strict=True):
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        n = len(ids)
        assert row[:n] == ids
        assert row[n] == eos  # kept as a label: it is what teaches the model to stop
        assert all(x == IGNORE_INDEX for x in row[n + 1 :])
    # The longest caption fills its row: no padding, and its eos is the last label.
    assert labels[1, -1].item() == eos


def test_truncated_captions_get_no_eos() -> None:
    tokenizer = train_tokenizer(CAPTIONS * 5, 400)
    labels = encode_captions(tokenizer, [CAPTIONS[1]], max_tokens=3)
    assert labels.shape == (1, 3)
    assert tokenizer.eos_token_id not in labels[0].tolist()


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    first = [batch_indices(1000, 32, seed=5, micro_step=s) for s in range(40)]
    again = [batch_indices(1000, 32, seed=5, micro_step=s) for s in range(40)]
    assert first == again
    # One epoch covers each item at most once; the next epoch is another permutation.
    epoch0 = [i for idx, epoch in first if epoch == 0 for i in idx]
    assert len(epoch0) == len(set(epoch0)) == 31 * 32
    assert first[31][1] == 1 and first[31][0] != first[0][0]
    assert batch_indices(1000, 32, seed=6, micro_step=0) != first[0]


def test_tiny_data_sets_still_fill_a_batch() -> None:
    indices, _ = batch_indices(3, 8, seed=0, micro_step=0)
    assert len(indices) == 8 and set(indices) <= {0, 1, 2}


def test_hash_seed_is_stable() -> None:
    assert hash_seed(1, 2) == hash_seed(1, 2) != hash_seed(2, 1)
    assert 0 <= hash_seed(-5, 10**12) < 2**63
    torch.Generator().manual_seed(hash_seed(123, 456))  # accepted by torch
