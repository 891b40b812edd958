"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium: for the attention page's test
and the README's screenshot of it."""
import shutil

# What Chromium needs to run as root in a container without a display, and to stay off the network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")
PACKAGES = "Debian packages chromium and chromium-driver; .ci/run installs them"
MISSING = f"Chromium is not installed ({PACKAGES})"


def missing():
    """Why Chromium cannot be driven here: which of chromium and chromedriver is not on PATH; None if both are."""
    absent = [program for program in ("chromium", "chromedriver") if not shutil.which(program)]
    return f"{' and '.join(absent)} not found on PATH ({PACKAGES})" if absent else None


def start_chromium(profile_dir, width=1400, height=1000):
    """A selenium driver of a fresh headless Chromium (its profile in `profile_dir`), or None when none is installed."""
    if missing():
        return None
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    from selenium import webdriver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS + (f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, for get_log("browser")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
