"""Attention weights (valid, exact under padding, from the prediction's own pass), their figure, page and CLI."""
import io
import os

import numpy as onp
import pytest

import browser
from browser import missing, start_chromium
from conftest import DEV_PAIRS, RESERVED, build_vocab_tokens, run_cli

from nli import attention, cli, data, predict, snli

SIZES = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=4, num_blks=2, max_len=64)
PREMISE, HYPOTHESIS = "A man sleeps on a bench in the park.", "A person is awake."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir holding a small, randomly initialized classifier (2 layers, 4 heads) over the real data's words."""
    import mxnet as mx
    from mxnet import init, np
    from nli import bert, model
    mx.random.seed(2)
    vocab = bert.Vocab(build_vocab_tokens(), reserved_tokens=RESERVED)
    encoder = bert.BERTModel(len(vocab), dropout=0.0, **SIZES)
    net = model.BERTClassifier(encoder)
    net.initialize(init.Normal(0.5))  # large weights: attention far from uniform
    tokens = np.array([[1, 2, 3]], dtype="int32")
    net(tokens, np.zeros_like(tokens), np.array([3.0]))
    folder = str(tmp_path_factory.mktemp("run"))
    model.save_run(folder, net, vocab, {"max_len": 48, "truncation": "longest_first"})
    return folder


@pytest.fixture(scope="module")
def predictor(run_dir):
    return predict.load_predictor(run_dir, batch_size=8)


@pytest.fixture(scope="module")
def pair(predictor):
    return predictor.attention(PREMISE, HYPOTHESIS)


def dev_pairs(n):
    premises, hypotheses, _ = snli.read_pairs(DEV_PAIRS)
    return list(zip(premises[:n], hypotheses[:n]))


def batched_weights(predictor, pairs):
    """(encoded pairs, their probabilities and weights run as one batch padded past the longest pair)."""
    from mxnet import np
    encoded = predictor.encode_text(pairs, tokenized=True)
    tokens, segments, valid_lens, _ = data.make_batch(encoded, onp.arange(len(pairs)))
    probabilities, weights = attention.attention_graph(predictor.net)(np.array(tokens), np.array(segments),
                                                                      np.array(valid_lens))
    return encoded, probabilities.asnumpy(), weights.asnumpy()


def test_shape_tokens_and_segments_match_the_model_and_the_pair(pair):
    length = len(pair.tokens)
    assert pair.weights.shape == (SIZES["num_blks"], SIZES["num_heads"], length, length)
    assert pair.tokens[:3] == ["<cls>", "a", "man"] and pair.tokens[-1] == "<sep>"
    assert pair.tokens[pair.boundary - 1] == "<sep>"
    assert pair.tokens[pair.boundary:] == "a person is awake . <sep>".split()
    assert pair.segments.tolist() == [0] * pair.boundary + [1] * (length - pair.boundary)


def test_weights_sum_to_one_over_valid_keys_and_padding_gets_zero(predictor):
    encoded, _, weights = batched_weights(predictor, dev_pairs(8))
    assert weights.shape[-1] > encoded.valid_lens.max()  # padded past the longest pair too
    for i, n in enumerate(encoded.valid_lens):
        onp.testing.assert_allclose(weights[i, :, :, :n, :n].sum(axis=-1), 1.0, atol=1e-5)
        assert not weights[i, :, :, :, n:].any(), f"pair {i}: a padding position got weight"
        assert weights[i, :, :, :n, :n].std() > 0.05  # not uniform: the check above could not pass by chance


def test_a_pair_alone_has_the_weights_it_has_batched_with_longer_pairs(predictor):
    pairs = dev_pairs(8)
    encoded, probabilities, weights = batched_weights(predictor, pairs)
    shortest = int(encoded.valid_lens.argmin())
    assert encoded.valid_lens[shortest] < encoded.valid_lens.max()
    alone = predictor.attention(*pairs[shortest], tokenized=True)
    n = len(alone.tokens)
    assert n == encoded.valid_lens[shortest]
    assert onp.abs(alone.weights - weights[shortest, :, :, :n, :n]).max() < 1e-5
    assert list(alone.probabilities.values()) == pytest.approx(probabilities[shortest].tolist(), abs=1e-5)


def test_label_and_probabilities_are_the_predictions_and_the_classifier_graph_is_untouched(predictor, pair):
    predicted = predictor.predict(PREMISE, HYPOTHESIS)
    assert pair.label == predicted["label"]
    assert list(pair.probabilities.values()) == pytest.approx(list(predicted["probabilities"].values()), abs=1e-5)
    assert all(blk.attention.weights_sink is None for blk in predictor.net.encoder.blks)
    graph = attention.attention_graph(predictor.net)
    assert attention.attention_graph(predictor.net) is graph  # built once per classifier
    shared = predictor.net.collect_params()
    assert all(p is shared[name] for name, p in graph.collect_params().items())  # its parameters, not copies


def test_the_graph_sees_updated_parameters(run_dir):
    changed = predict.load_predictor(run_dir)
    before = changed.attention(PREMISE, HYPOTHESIS)
    queries = changed.net.encoder.blks[0].attention.W_q.weight
    queries.set_data(queries.data() * 3)  # in place, as a training step updates it
    after = changed.attention(PREMISE, HYPOTHESIS)
    assert onp.abs(after.weights[0] - before.weights[0]).max() > 1e-3
    assert list(after.probabilities.values()) == pytest.approx(
        list(changed.predict(PREMISE, HYPOTHESIS)["probabilities"].values()), abs=1e-5)


def test_figure_has_a_panel_per_layer_and_head_tokens_boundary_and_prediction(pair):
    layers, heads = SIZES["num_blks"], SIZES["num_heads"]
    for mode, panels in (("all", layers * heads), ("mean", layers)):
        fig = attention.attention_figure(pair, mode)
        maps = [ax for ax in fig.axes if ax.images and ax.get_title()]
        assert len(maps) == panels
        assert [t.get_text() for t in maps[0].get_yticklabels()] == pair.tokens
        assert [t.get_text() for t in maps[-1].get_xticklabels()] == pair.tokens
        last = f"layer {layers}, head {heads}" if mode == "all" else f"layer {layers}, heads' mean"
        assert maps[-1].get_title() == last
        assert any(list(line.get_xdata()) == [pair.boundary - 0.5] * 2 for line in maps[0].lines)
        expected = pair.weights.mean(axis=1)[-1] if mode == "mean" else pair.weights[-1, -1]
        onp.testing.assert_allclose(maps[-1].images[0].get_array(), expected)
        title = fig._suptitle.get_text()
        assert f"predicted {pair.label}" in title and f"{pair.probabilities[pair.label]:.2f}" in title
        assert PREMISE in title and HYPOTHESIS in title
    with pytest.raises(attention.UserError, match="heads"):
        attention.attention_figure(pair, "max")


def test_html_page_is_self_contained(pair, tmp_path):
    path = tmp_path / "view.html"
    attention.save_view(pair, str(path))
    page = path.read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # opens offline
    assert '"label": "' + pair.label + '"' in page


def test_html_page_renders_in_a_real_browser(pair, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    path = tmp_path / "view.html"
    attention.save_view(pair, str(path))
    driver = start_chromium(tmp_path / "profile")
    if driver is None:
        pytest.skip(missing())
    try:
        driver.get(path.as_uri())
        layers, heads = SIZES["num_blks"], SIZES["num_heads"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#layer option")) == layers
        assert len(driver.find_elements(By.CSS_SELECTOR, "#head option")) == heads + 1  # and their mean
        assert len(driver.find_elements(By.CSS_SELECTOR, "#overview canvas")) == layers * (heads + 1)
        assert pair.label in driver.find_element(By.CSS_SELECTOR, ".prob.top").text
        picture = driver.execute_script("return document.getElementById('map').toDataURL()")
        Select(driver.find_element(By.ID, "head")).select_by_value("2")
        assert driver.find_element(By.ID, "map").get_attribute("data-view") == "layer 1, head 3"
        assert driver.execute_script("return document.getElementById('map').toDataURL()") != picture

        query = pair.tokens.index("person")
        tokens = driver.find_elements(By.CSS_SELECTOR, "#tokens span[data-i]")
        ActionChains(driver).move_to_element(tokens[query]).perform()
        top = pair.tokens[int(pair.weights[0, 2, query].argmax())]
        assert driver.find_element(By.ID, "readout").text.startswith(f"person attends to: {top} ")
        shaded = [token.value_of_css_property("background-color") for token in tokens]
        assert len(set(shaded)) > 2  # each token shaded by the weight "person" gives it

        Select(driver.find_element(By.ID, "layer")).select_by_value("1")
        Select(driver.find_element(By.ID, "head")).select_by_value("mean")
        assert driver.find_element(By.ID, "map").get_attribute("data-view") == "layer 2, head mean"
        screenshot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        heatmap = Image.open(io.BytesIO(driver.find_element(By.ID, "map").screenshot_as_png)).convert("RGB")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    finally:
        driver.quit()
    assert not errors, errors
    pixels = onp.asarray(screenshot).reshape(-1, 3)
    assert len(onp.unique(pixels, axis=0)) > 100 and pixels.std() > 20  # drawn, not a blank page
    cells = onp.asarray(heatmap).reshape(-1, 3).astype(int)
    dark_red = (cells[:, 0] - cells[:, 1] > 80) & (cells[:, 1] < 60)
    assert dark_red.sum() > 50 and len(onp.unique(cells, axis=0)) > 20  # the map's cells, shaded by weight


def test_cli_writes_the_views_and_refuses_what_it_cannot_draw(run_dir, tmp_path):
    png, page = tmp_path / "attention.png", tmp_path / "attention.html"
    result = run_cli("predict", "--run", run_dir, "--devices", "cpu", PREMISE, HYPOTHESIS, "--attention", png,
                     "--heads", "mean")
    assert result.returncode == 0, result.stderr
    assert f"wrote {png}: attention of 2 layers x 4 heads over 18 tokens" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_cli("predict", "--run", run_dir, "--devices", "cpu", PREMISE, HYPOTHESIS, "--attention", page)
    assert result.returncode == 0, result.stderr
    assert page.read_text().startswith("<!DOCTYPE html>")
    result = run_cli("predict", "--run", run_dir, PREMISE, HYPOTHESIS, "--attention", tmp_path / "a.svg")
    assert result.returncode == 2 and "expected a .png (figure) or .html" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("predict", "--run", run_dir, "--file", DEV_PAIRS, "--attention", png)
    assert result.returncode == 2 and "--attention draws one pair" in result.stderr
    assert not os.path.exists(str(png) + ".tmp")


def test_heads_without_a_figure_to_draw_is_refused(run_dir, tmp_path, capsys):
    for drawing in ([], ["--attention", str(tmp_path / "a.html")]):  # was: ignored, then the prediction
        assert cli.main(["predict", "--run", run_dir, PREMISE, HYPOTHESIS, "--heads", "mean", *drawing]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == "error: --heads chooses what the --attention FILE.png figure shows (the .html " \
                                    "page has a menu for it): add --attention FILE.png, or drop --heads.\n"
    assert not os.path.exists(tmp_path / "a.html")


def test_the_browser_tests_skip_reason_names_what_is_missing(monkeypatch):
    installed = {"chromium"}  # Chromium is, its driver is not: was "Chromium is not installed"
    monkeypatch.setattr(browser.shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None)
    assert missing() == "chromedriver not installed (Debian package chromium-driver; .ci/run installs them)"
    installed = set()
    assert missing() == ("chromium and chromedriver not installed (Debian packages chromium and chromium-driver; "
                         ".ci/run installs them)")
    installed = {"chromium", "chromedriver"}
    assert missing() is None
