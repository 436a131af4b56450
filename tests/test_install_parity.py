"""README's quick start installs the test dependencies CI installs (issue 11, item 7): a new user who
follows it runs the same tests as ``.ci/run`` (the Triton tests included) instead of skipping them."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _pip_lines(text):
    return [line for line in text.splitlines() if re.search(r"\bpip install\b", line)]


def _requirements(spec_lines):
    """Quoted or bare requirement tokens on pip lines, and the -r files they read."""
    packages, files = set(), set()
    for line in spec_lines:
        line = line.split("#", 1)[0]
        tokens = re.findall(r'"[^"]+"|\S+', line)
        for i, token in enumerate(tokens):
            token = token.strip('"')
            if tokens[i - 1] == "-r" if i else False:
                files.add(token)
            elif re.match(r"^[A-Za-z][A-Za-z0-9_.-]*(==|>=|<|$)", token) and token not in ("pip", "install",
                                                                                               "python", "-m"):
                packages.add(token)
    return packages, files


def test_readme_quick_start_installs_what_ci_installs():
    readme = _read("README.md")
    quick_start = readme[readme.index("## Quick start"):readme.index("## The loss")]
    ci_packages, ci_files = _requirements(_pip_lines(_read(".ci/run")))
    readme_packages, readme_files = _requirements(_pip_lines(quick_start))
    pinned = {p for p in ci_packages if re.search(r"==|<", p)}  # torch==..., triton==..., numpy<...
    assert pinned, ci_packages
    assert pinned <= readme_packages, f"CI installs {sorted(pinned - readme_packages)} that README's quick start does not"
    assert ci_files <= readme_files, f"CI installs {sorted(ci_files - readme_files)} that README's quick start does not"


def test_setup_test_extra_covers_the_ci_test_pins():
    setup = _read("setup.py")
    extra = re.search(r'"test": \[([^\]]*)\]', setup).group(1)
    extra_names = {re.split(r"[<>=]", item.strip().strip('"'))[0].lower() for item in extra.split(",") if item.strip()}
    requirements = _read("requirements-ci.txt")
    test_section = requirements.split("# test", 1)[1].split("\n# ", 1)[0]
    pinned = {line.split("==")[0].strip().lower() for line in test_section.splitlines() if "==" in line}
    assert pinned and pinned <= extra_names, f"setup.py's test extra lacks {sorted(pinned - extra_names)}"
    assert "triton" in extra_names, "the test extra must install Triton: CI runs the Triton tests"
