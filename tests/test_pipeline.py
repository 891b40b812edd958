"""The input pipeline: the book's arrays, both truncation rules, the cache, length buckets, exact padding."""
import dataclasses
import importlib
import json
import os
import time
import types

import mxnet as mx
import numpy as onp
import pytest
from mxnet import init, np, npx

from conftest import DEV_PAIRS, RESERVED, run_cli
from nli import bert, data, memory, model, snli, train
from nli.errors import UserError
from nli.recipe import TUNED, Recipe

npx.set_np()


@pytest.fixture(scope="module")
def book():
    """The book's SNLIBERTDataset, in tests/book_reference.py, which runs on d2l."""
    pytest.importorskip("d2l.mxnet", reason="the book's code needs d2l 1.0.3, which installs only beside "
                                            "numpy 1.23.5 (Python 3.11)")
    return importlib.import_module("book_reference")


@pytest.fixture(scope="module")
def dev_pairs():
    return snli.read_pairs(DEV_PAIRS)


@pytest.fixture(scope="module")
def vocab(dev_pairs):
    """The book's vocabulary over the dev pairs; min_freq 2 leaves rare words unknown, as real data does."""
    tokens = [t for sentence in dev_pairs[0] + dev_pairs[1] for t in snli.tokenize(sentence)]
    return bert.Vocab(tokens, min_freq=2, reserved_tokens=RESERVED)


class SerialPool:
    """Stands in for the book's `multiprocessing.Pool(4)`, which is never closed: same map, no workers left."""

    def __init__(self, processes):
        pass

    def map(self, function, items):
        return list(map(function, items))


@pytest.mark.parametrize("max_len", [128, 24])
def test_arrays_equal_the_books_dataset_on_real_pairs(book, dev_pairs, vocab, max_len, monkeypatch):
    monkeypatch.setattr(book.multiprocessing, "Pool", SerialPool)
    expected = book.SNLIBERTDataset(dev_pairs, max_len, vocab)
    encoded = snli.encode_pairs(*dev_pairs, vocab, max_len)
    tokens, segments, valid_lens = encoded.padded(onp.arange(len(encoded)), max_len)
    onp.testing.assert_array_equal(tokens, expected.all_token_ids.asnumpy())
    onp.testing.assert_array_equal(segments, expected.all_segments.asnumpy())
    onp.testing.assert_array_equal(valid_lens, expected.valid_lens.asnumpy())
    onp.testing.assert_array_equal(encoded.labels, expected.labels.asnumpy())
    assert (tokens == vocab.unk).any()
    assert (valid_lens == max_len).sum() > (100 if max_len == 24 else -1)  # max_len 24 truncates many pairs


def test_chunks_and_repeated_sentences_give_the_same_arrays(dev_pairs, vocab, monkeypatch):
    premises, hypotheses, labels = (list(column[:3000]) for column in dev_pairs)
    premises[10:14] = [premises[10]] * 4  # runs of repeats, also across a chunk's edge (1000)
    hypotheses[998:1003] = [hypotheses[998]] * 5
    expected = [vocab[["<cls>"] + snli.tokenize(p) + ["<sep>"] + snli.tokenize(h) + ["<sep>"]]
                for p, h in zip(premises, hypotheses)]  # no pair is over 128 tokens
    monkeypatch.setattr(snli, "CHUNK_PAIRS", 1000)
    encoded = snli.encode_pairs(premises, hypotheses, labels, vocab, 128)
    assert [list(encoded.token_ids[a:b]) for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])] == expected
    assert_same(encoded, snli.encode_pairs(premises, hypotheses, labels, vocab, 128, progress=True))


def test_longest_first_is_the_books_loop_in_closed_form(book):
    for max_len in range(3, 24):
        lens = onp.array([(p, h) for p in range(30) for h in range(30)])
        p_kept, h_kept = snli.truncated_lengths(lens[:, 0], lens[:, 1], max_len)
        for (p, h), got in zip(lens, zip(p_kept, h_kept)):
            p_tokens, h_tokens = list(range(p)), list(range(h))
            book.SNLIBERTDataset._truncate_pair_of_tokens(types.SimpleNamespace(max_len=max_len), p_tokens, h_tokens)
            assert got == (len(p_tokens), len(h_tokens)), (max_len, p, h)


def test_ratio_keeps_each_side_in_proportion():
    p_kept, h_kept = snli.truncated_lengths([90, 200, 1, 10, 40, 7], [30, 1, 200, 10, 40, 3], max_len=43,
                                            truncation="ratio")
    assert list(p_kept) == [30, 39, 1, 10, 20, 7]  # 90:30 of 40 slots is 30:10; a lone token on a side stays
    assert list(h_kept) == [10, 1, 39, 10, 20, 3]
    rng = onp.random.RandomState(0)
    p, h = rng.randint(0, 150, 5000), rng.randint(0, 150, 5000)
    p_kept, h_kept = snli.truncated_lengths(p, h, 64, "ratio")
    assert ((p_kept <= p) & (h_kept <= h)).all()
    assert (p_kept + h_kept == onp.minimum(p + h, 61)).all()
    over = (p + h > 61) & (p > 0) & (h > 0)
    share = 61 * p[over] / (p + h)[over]
    assert (onp.abs(p_kept[over] - share) <= 0.5 + (onp.minimum(p_kept[over], h_kept[over]) == 1)).all()


@pytest.mark.parametrize("truncation", ["longest_first", "ratio"])
def test_long_pairs_keep_leading_tokens_and_fill_max_len(vocab, truncation):
    words = [w for w in vocab.idx_to_token if w.isalpha()][:200]
    premises = [" ".join(words[:150]), " ".join(words[:5])]
    hypotheses = [" ".join(words[150:200]), " ".join(words[100:190])]
    encoded = snli.encode_pairs(premises, hypotheses, [0, 2], vocab, 32, truncation)
    tokens, segments, valid_lens = encoded.padded(onp.arange(2), 32)
    assert list(valid_lens) == [32, 32]
    p_kept, h_kept = snli.truncated_lengths([150, 5], [50, 90], 32, truncation)
    for i, (premise, hypothesis) in enumerate(zip(premises, hypotheses)):
        expected = (["<cls>"] + premise.split()[:p_kept[i]] + ["<sep>"] + hypothesis.split()[:h_kept[i]]
                    + ["<sep>"])
        assert vocab.to_tokens(list(tokens[i])) == expected
        assert list(segments[i]) == [0] * (p_kept[i] + 2) + [1] * (h_kept[i] + 1)
    if truncation == "ratio":
        assert (list(p_kept), list(h_kept)) == ([22, 2], [7, 27])
    else:
        assert (list(p_kept), list(h_kept)) == ([15, 5], [14, 24])


def test_word_ids_splits_and_lowercases_as_the_book(vocab):
    sentences = ["A Dog\u00a0RUNS", "tab\tand\x1cfile separator", "\x00 nul and \x01 soh", "",
                 "ΟΔΟΣ", "Zebra\u3000zebra", "  spaces  "]
    flat, lengths = snli.word_ids(sentences, vocab)
    expected = [vocab[s.lower().split()] for s in sentences]
    assert list(lengths) == [len(ids) for ids in expected]
    assert list(flat) == [i for ids in expected for i in ids]


def test_assemble_pairs_takes_any_tokenizers_ids():
    premises = [[7, 8, 9, 10, 11], [12], []]
    hypotheses = [[20, 21], [22, 23, 24, 25, 26, 27], [28]]
    encoded = snli.assemble_pairs(snli.ragged(premises), snli.ragged(hypotheses), [1, 0, 2], cls_id=101,
                                  sep_id=102, pad_id=0, max_len=8)
    rows = [list(encoded.token_ids[a:b]) for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])]
    assert rows == [[101, 7, 8, 9, 102, 20, 21, 102], [101, 12, 102, 22, 23, 24, 25, 102], [101, 102, 28, 102]]
    assert list(encoded.segment_a_lens) == [5, 3, 2] and list(encoded.labels) == [1, 0, 2]


def test_bad_settings_fail_clearly(vocab):
    with pytest.raises(UserError, match="truncation 'middle'"):
        snli.encode_pairs(["a"], ["b"], [0], vocab, 16, "middle")
    with pytest.raises(UserError, match="max_len 2"):
        snli.encode_pairs(["a"], ["b"], [0], vocab, 2)


def write_pairs(path, n, first_word="A"):
    rows = [f"{first_word} man number {i} plays .\tSomeone plays .\tentailment" for i in range(n)]
    path.write_text("premise\thypothesis\tlabel\n" + "\n".join(rows) + "\n")
    return str(path)


def assert_same(a, b):
    for field in ("token_ids", "offsets", "segment_a_lens", "labels"):
        onp.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_cache_is_reused_and_rebuilt_when_anything_changes(tmp_path, vocab, monkeypatch, capsys):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    source = write_pairs(tmp_path / "pairs.tsv", 50)
    builds = []
    encode = snli.encode_pairs
    monkeypatch.setattr(snli, "encode_pairs", lambda *a, **k: builds.append(a[3]) or encode(*a, **k))

    first = snli.load_encoded(source, vocab, 16)
    assert len(first) == 50 and len(builds) == 1
    assert_same(snli.load_encoded(source, vocab, 16), first)
    assert len(builds) == 1  # served from the cache
    [cache_file] = os.listdir(tmp_path / "data" / "encoded")

    snli.load_encoded(source, vocab, 12)  # another max_len: its own cache file
    snli.load_encoded(source, vocab, 16, "ratio")
    other_vocab = bert.Vocab(["man", "plays"], reserved_tokens=RESERVED)
    assert snli.load_encoded(source, other_vocab, 16).token_ids.max() < len(other_vocab)
    assert len(builds) == 4 and len(os.listdir(tmp_path / "data" / "encoded")) == 4

    write_pairs(tmp_path / "pairs.tsv", 60)  # the source changes: rebuilt in place
    assert len(snli.load_encoded(source, vocab, 16)) == 60 and len(builds) == 5
    assert len(os.listdir(tmp_path / "data" / "encoded")) == 4

    cache_path = tmp_path / "data" / "encoded" / cache_file
    whole = cache_path.read_bytes()
    cache_path.write_bytes(whole[:len(whole) // 2])  # a partial file, as a crash mid-write would leave
    assert len(snli.load_encoded(source, vocab, 16)) == 60 and len(builds) == 6
    assert "unreadable cache" in capsys.readouterr().err

    with onp.load(cache_path) as f:  # a whole file whose arrays no longer match their checksum
        arrays = dict(f)
    arrays["token_ids"] = arrays["token_ids"][::-1].copy()
    with open(cache_path, "wb") as f:
        onp.savez(f, **arrays)
    assert_same(snli.load_encoded(source, vocab, 16), snli.encode_pairs(*snli.read_pairs(source), vocab, 16))
    assert len(builds) == 8 and "fails its checksum" in capsys.readouterr().err
    assert not [name for name in os.listdir(tmp_path / "data" / "encoded") if name.endswith(".tmp")]


def test_missing_source_is_a_clear_error(tmp_path, vocab, monkeypatch):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(UserError, match="Missing data file"):
        snli.load_encoded(str(tmp_path / "absent.tsv"), vocab, 16)


def padded_tokens(encoded, order):
    return sum(data.make_batch(encoded, indices)[0].size for indices in order)


def test_length_buckets_cover_every_pair_once_with_little_padding(dev_pairs, vocab):
    encoded = snli.encode_pairs(*dev_pairs, vocab, 128)
    lengths = encoded.valid_lens
    sampler = data.LengthBucketSampler(lengths, 512, shuffle=True, seed=3, epoch=1)
    assert isinstance(sampler, mx.gluon.data.Sampler)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-len(encoded) // 512)
    assert sorted(onp.concatenate(batches)) == list(range(len(encoded)))
    assert sum(len(b) < 512 for b in batches) == 1
    ranges = [(k.min(), k.max()) for k in (-(-lengths[b] // 8) for b in batches)]
    assert ranges != sorted(ranges)  # batches are shuffled across buckets
    ranges.sort()
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # batches cut buckets laid end to end
    again = list(data.LengthBucketSampler(lengths, 512, shuffle=True, seed=3, epoch=1))
    assert all((a == b).all() for a, b in zip(batches, again))
    next_epoch = list(data.LengthBucketSampler(lengths, 512, shuffle=True, seed=3, epoch=2))
    assert {frozenset(b) for b in next_epoch}.isdisjoint(frozenset(b) for b in batches)  # shuffled in buckets
    least = int((-(-lengths // 8) * 8).sum())  # every pair alone, padded to a multiple of 8
    assert padded_tokens(encoded, batches) < 1.1 * least
    assert padded_tokens(encoded, data.batch_order(len(encoded), 512, shuffle=True)) > 2 * least
    in_order = list(data.LengthBucketSampler(lengths, 100, shuffle=False))
    assert (onp.diff(onp.concatenate([-(-lengths[b] // 8) for b in in_order])) >= 0).all()


def test_training_batches_take_pairs_of_one_length_and_runs_saved_before_keep_buckets_8_wide(dev_pairs, vocab):
    encoded = snli.encode_pairs(*dev_pairs, vocab, 128)
    lengths = encoded.valid_lens
    shape = memory.Shape(layers=2, hidden=64, ffn=128, heads=4, parameters=1000, trainable=1000)
    plan = memory.MemoryPlan(2 ** 40, shape, max_len=128)  # room for any batch: one micro-batch each

    def padded(recipe):  # the token arrays of epoch 1's micro-batches, as `train.PairsTask` makes them
        batches = train.Shards(lengths, recipe, 1).batches(1)[0]
        return batches, [[data.make_batch(encoded, part, recipe.bucket_width)[0]
                          for part in plan.split(indices, lengths, recipe.bucket_width)] for indices in batches]

    recipe = dataclasses.replace(TUNED, batch_size=32)
    assert recipe.bucket_width == 1
    batches, arrays = padded(recipe)
    assert all(t.shape[1] == lengths[b].max() for b, parts in zip(batches, arrays) for t in parts)  # no padding past
    assert sum(len(set(lengths[b])) == 1 for b in batches) > 0.8 * len(batches)  # but where a length runs out
    ranges = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # cut from the pairs sorted by length
    assert sorted(onp.concatenate(batches)) == list(range(len(encoded)))
    _, legacy_arrays = padded(dataclasses.replace(recipe, bucket_width=8))
    tokens = lambda arrays: sum(t.size for parts in arrays for t in parts)  # noqa: E731
    assert tokens(arrays) < 0.92 * tokens(legacy_arrays) and tokens(arrays) < 1.03 * lengths.sum()

    saved = dataclasses.asdict(recipe)
    assert Recipe.from_checkpoint({"recipe": saved}) == recipe
    del saved["bucket_width"]  # config.json and checkpoints of runs made before the setting: they bucketed by 8
    assert Recipe.from_checkpoint({"recipe": saved}).bucket_width == 8


def test_batches_pad_to_a_multiple_of_8_and_split_over_devices(dev_pairs, vocab):
    encoded = snli.encode_pairs(*dev_pairs, vocab, 128).head(300)
    seen = []
    for tokens, segments, valid_lens, labels in data.batches(encoded, 64, shuffle=True):
        assert tokens.shape[1] % 8 == 0 and valid_lens.max() <= tokens.shape[1] < valid_lens.max() + 8
        assert tokens.dtype == segments.dtype == onp.int32
        shards = data.split_batch((tokens, segments, valid_lens, labels), [mx.cpu(0), mx.cpu(1)])
        assert [s[0].ctx for s in shards] == [mx.cpu(0), mx.cpu(1)]
        onp.testing.assert_array_equal(onp.concatenate([s[0].asnumpy() for s in shards]), tokens)
        seen.extend(labels)
    assert sorted(seen) == sorted(encoded.labels)


def test_a_batch_reaches_the_device_without_waiting_for_the_work_queued_before():
    a = np.ones((2500, 2500)) / 2500
    product = np.dot(a, a)  # a second or so of work for the engine's CPU worker
    time.sleep(0.05)  # for the worker to take it up
    started = time.perf_counter()
    tokens = onp.arange(12, dtype=onp.int32).reshape(3, 4)
    (shard,), = data.split_batch((tokens,), [mx.cpu()])
    returned = time.perf_counter() - started
    product.wait_to_read()
    drained = time.perf_counter() - started
    assert returned < drained / 10  # mx.np.array's copy waits for the worker: it returns with the product
    assert shard.dtype == onp.int32 and (shard.asnumpy() == tokens).all()
    tokens[0, 0] = 99  # the batch is a copy: the caller's array stays its own
    assert shard[0, 0] == 0


def test_trimmed_padding_gives_the_same_logits(dev_pairs, vocab):
    mx.random.seed(0)
    small = bert.BERTModel(len(vocab), 64, 128, 4, 2, dropout=0.0, max_len=128)
    small.initialize(init.Xavier())
    net = model.BERTClassifier(small)
    net.output.initialize(init.Xavier())
    net.hybridize(static_alloc=True)
    encoded = snli.encode_pairs(*dev_pairs, vocab, 128)
    indices = onp.argsort(-encoded.valid_lens)[::400][:24]  # lengths from the longest down to short
    longest = int(encoded.valid_lens[indices].max())
    assert data.make_batch(encoded, indices)[0].shape[1] == -(-longest // 8) * 8 < 128

    def logits(length):
        tokens, segments, valid_lens = encoded.padded(indices, length)
        return net(np.array(tokens), np.array(segments), np.array(valid_lens, dtype="float32")).asnumpy()

    full = logits(128)
    for length in (longest, -(-longest // 8) * 8):  # trimmed to the longest pair, and as batches are
        assert onp.abs(logits(length) - full).max() < 1e-5
    assert onp.abs(full).max() > 1e-2  # the logits are not all ~0, so the comparison means something


def test_finetune_truncation_flag_reaches_the_run_config(tmp_path, hub_env):
    result = run_cli("finetune", "--model", "bert.small", "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                     "--limit-train", 64, "--limit-test", 32, "--max-len", 16, "--truncation", "ratio",
                     "--epochs", 1, "--batch-size", 32, "--devices", "cpu", "--quiet", "--out", tmp_path / "run",
                     env=hub_env)
    assert result.returncode == 0, result.stderr
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["truncation"] == "ratio" and config["max_len"] == 16
    cached = os.listdir(os.path.join(hub_env["NLI_DATA_DIR"], "encoded"))
    assert len(cached) == 1 and cached[0].startswith("snli_1.0_dev_pairs.tsv.")  # train and test: one file
    bad = run_cli("finetune", "--model", "bert.small", "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                  "--truncation", "middle", "--out", tmp_path / "bad", env=hub_env)
    assert bad.returncode == 2 and "longest_first" in bad.stderr
