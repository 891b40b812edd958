"""The package against the book: d2l's saved BERT loads unchanged, read_snli agrees, devices agree."""
import json
import os

import mxnet as mx
import numpy as onp
import pytest
from mxnet import np, npx

from conftest import D2L, DATA, DEV_PAIRS, RESERVED, SAMPLE_DIR, jsonl_to_txt, needs_d2l, save_book_bert
from nli import bert, data, model, snli, train
from nli.errors import UserError

npx.set_np()
TINY = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=4, num_blks=2, max_len=64)
BOOK_BERT_TINY = os.path.join(DATA, "book_bert_tiny")  # saved by d2l.BERTModel: make_book_bert_tiny.py
# How far outputs may lie from expected.npz, which d2l computed on an AMD EPYC (AVX2 only): oneDNN picks other
# kernels on other CPUs, so the sums of two blocks' 32- and 64-term dot products round differently. Measured on
# an Intel Xeon (AVX-512, VNNI, AMX): 9.5e-7, 4 ulps of the largest output (3.3). 4e-6 is 16 ulps, and 3x below
# what a real loading fault gives (LayerNorm epsilon 1e-12, BERT's, instead of the book's 1e-5: 1.3e-5).
CROSS_CPU_ATOL = 4e-6


@pytest.fixture(scope="module")
def tiny_book_dir(tmp_path_factory):
    """A d2l.BERTModel of tiny size saved as the book saves it, with a config.json giving its sizes."""
    folder = save_book_bert(str(tmp_path_factory.mktemp("tiny") / "bert.tiny"), **TINY)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(TINY, dropout=0.0), f)
    return folder


def test_bert_saved_by_d2l_gives_the_outputs_d2l_gave_on_every_python():
    expected = onp.load(os.path.join(BOOK_BERT_TINY, "expected.npz"))
    ours, vocab = bert.load_pretrained(BOOK_BERT_TINY, [mx.cpu()])
    inputs = [np.array(expected[name]) for name in ("tokens", "segments", "valid_lens")]
    got, _, got_nsp = ours(*inputs)
    assert len(vocab) == ours.config.vocab_size > 50
    assert onp.abs(got.asnumpy() - expected["encoded"]).max() < CROSS_CPU_ATOL
    assert onp.abs(got_nsp.asnumpy() - expected["nsp"]).max() < CROSS_CPU_ATOL
    ours.encoder.hybridize(static_alloc=True)
    assert onp.abs(ours.encoder(*inputs).asnumpy() - expected["encoded"]).max() < CROSS_CPU_ATOL


@needs_d2l
def test_vocab_gives_the_ids_of_d2l_vocab():
    premises, hypotheses, _ = snli.read_pairs(DEV_PAIRS)
    tokens = [t for s in premises + hypotheses for t in snli.tokenize(s)]
    for min_freq in (0, 2):
        ours = bert.Vocab(tokens, min_freq=min_freq, reserved_tokens=RESERVED)
        book = D2L.Vocab(tokens, min_freq=min_freq, reserved_tokens=RESERVED)
        assert ours.idx_to_token == book.idx_to_token and ours.token_to_idx == book.token_to_idx
        assert ours[["a", "man", "zzqx"]] == book[["a", "man", "zzqx"]] and ours.unk == book.unk
        assert ours.to_tokens([5, 9]) == book.to_tokens([5, 9]) and ours.to_tokens(7) == book.to_tokens(7)
    assert len(ours) < len(bert.Vocab(tokens, reserved_tokens=RESERVED))  # min_freq 2 left words out


@needs_d2l
def test_d2l_saved_bert_loads_with_identical_outputs(tiny_book_dir):
    vocab_size = len(bert.load_vocab(os.path.join(tiny_book_dir, "vocab.json")))
    reference = D2L.BERTModel(vocab_size, dropout=0.0, **TINY)
    reference.load_parameters(os.path.join(tiny_book_dir, "pretrained.params"))
    ours, _ = bert.load_pretrained(tiny_book_dir, [mx.cpu()])
    tokens = np.array(onp.random.RandomState(0).randint(0, vocab_size, (3, 20)), dtype="int32")
    segments = np.array(onp.repeat([[0] * 8 + [1] * 12], 3, axis=0), dtype="int32")
    valid_lens = np.array([20.0, 9.0, 14.0])
    expected, _, expected_nsp = reference(tokens, segments, valid_lens)
    got, _, got_nsp = ours(tokens, segments, valid_lens)
    assert float(np.abs(got - expected).max()) < 1e-6
    assert float(np.abs(got_nsp - expected_nsp).max()) < 1e-6
    ours.encoder.hybridize(static_alloc=True)
    hybrid = ours.encoder(tokens, segments, valid_lens)
    assert float(np.abs(hybrid - expected).max()) < 1e-6


def test_mismatched_config_names_parameter_and_shapes(tiny_book_dir, tmp_path):
    bad = tmp_path / "bert.bad"
    bad.mkdir()
    for name in ("vocab.json", "pretrained.params"):
        os.symlink(os.path.join(tiny_book_dir, name), bad / name)
    (bad / "config.json").write_text(json.dumps(dict(TINY, ffn_num_hiddens=48)))
    with pytest.raises(UserError) as err:
        bert.load_pretrained(str(bad), [mx.cpu()])
    message = str(err.value)
    assert "encoder.blks.0.ffn.dense1.bias" in message or "encoder.blks.0.ffn.dense1.weight" in message
    assert "(64" in message and "(48" in message


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(UserError, match="neither a model directory nor a known model name"):
        bert.load_pretrained("bert.enormous", [mx.cpu()])


@needs_d2l
def test_read_snli_equals_d2l_on_the_real_format(tmp_path):
    for split in ("train", "test"):
        txt = os.path.join(SAMPLE_DIR, f"snli_1.0_{split}.txt")
        content = open(txt).read() if os.path.exists(txt) else \
            jsonl_to_txt(os.path.join(SAMPLE_DIR, f"snli_1.0_{split}.jsonl"))
        (tmp_path / f"snli_1.0_{split}.txt").write_text(content)
    for is_train in (True, False):
        ours = snli.read_snli(str(tmp_path), is_train)
        assert ours == tuple(D2L.read_snli(str(tmp_path), is_train))
        assert len(ours[0]) > 5


def test_jsonl_and_txt_of_one_split_read_alike():
    txt = snli.read_pairs(os.path.join(SAMPLE_DIR, "snli_1.0_dev.txt"))
    jsonl = snli.read_pairs(os.path.join(SAMPLE_DIR, "snli_1.0_dev.jsonl"))
    assert txt == jsonl


def test_no_gold_label_is_dropped_and_bad_label_names_file_and_line(tmp_path):
    good = tmp_path / "pairs.tsv"
    good.write_text("premise\thypothesis\tlabel\nA man .\tA person .\tentailment\n"
                    "A dog .\tA cat .\t-\nA b .\tC d .\tneutral\n")
    assert snli.read_pairs(str(good)) == (["A man .", "A b ."], ["A person .", "C d ."], [0, 2])
    bad = tmp_path / "bad.tsv"
    bad.write_text("premise\thypothesis\tlabel\nA man .\tA person .\tentailment\nA dog .\tA cat .\tmaybe\n")
    with pytest.raises(UserError, match=r"bad\.tsv, line 3: label 'maybe'"):
        snli.read_pairs(str(bad))
    short = tmp_path / "short.jsonl"
    short.write_text('{"sentence1": "A", "sentence2": "B", "gold_label": "neutral"}\n{"sentence1": "A"\n')
    with pytest.raises(UserError, match=r"short\.jsonl, line 2: not valid JSON"):
        snli.read_pairs(str(short))


def finetuned_params(model_dir, devices, steps=3):
    """Parameters after a few steps of fine-tuning with dropout 0 on `devices`, from the same seed."""
    train.seed_everything(0)
    net, vocab = model.from_pretrained(model_dir, devices, dropout=0.0)
    premises, hypotheses, labels = snli.read_pairs(os.path.join(SAMPLE_DIR, "snli_1.0_dev.jsonl"))
    encoded = snli.encode_pairs(premises, hypotheses, labels, vocab, 64)
    loss = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-4}, update_on_kvstore=False)
    for step in range(steps):
        batch = data.make_batch(encoded, onp.arange(len(encoded)))
        train.train_batch(net, batch, loss, devices)
        train.apply_update(trainer, net.collect_params(), devices, len(batch[-1]))
    return {name: p.data(devices[0]).asnumpy() for name, p in net._collect_params_with_prefix().items()}


def test_two_cpu_contexts_train_like_one(tiny_book_dir):
    one = finetuned_params(tiny_book_dir, [mx.cpu(0)])
    two = finetuned_params(tiny_book_dir, [mx.cpu(0), mx.cpu(1)])
    assert one.keys() == two.keys()
    moved = max(float(onp.abs(one[k] - two[k]).max()) for k in one)
    assert moved < 1e-5
    initial, _ = bert.load_pretrained(tiny_book_dir, [mx.cpu()])
    start = initial.encoder.blks[0].ffn.dense1.weight.data().asnumpy()
    assert float(onp.abs(one["encoder.blks.0.ffn.dense1.weight"] - start).max()) > 1e-4  # training moved it


def test_undecodable_bytes_name_the_line_and_skipped_pairs_are_counted(tmp_path, caplog):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes(b"premise\thypothesis\tlabel\nA man .\tA person .\tentailment\nA caf\xe9 .\tA shop .\tneutral\n")
    with pytest.raises(UserError, match=r"latin1\.tsv, line 3: not UTF-8"):
        snli.read_pairs(str(bad))
    bad_jsonl = tmp_path / "latin1.jsonl"
    bad_jsonl.write_bytes(b'{"premise": "A", "hypothesis": "B", "label": "neutral"}\n'
                          b'{"premise": "caf\xe9", "hypothesis": "B", "label": "neutral"}\n')
    with pytest.raises(UserError, match=r"latin1\.jsonl, line 2: not UTF-8"):
        snli.read_pairs(str(bad_jsonl))
    unlabelled = tmp_path / "pairs.tsv"
    unlabelled.write_text("premise\thypothesis\tlabel\nA .\tB .\t-\nC .\tD .\t-\nE .\tF .\tneutral\n")
    with caplog.at_level("WARNING"):
        assert snli.read_pairs(str(unlabelled))[2] == [2]
    assert "skipped 2 pairs without a gold label" in caplog.text
