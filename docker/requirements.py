"""Print pyproject.toml's runtime dependencies one per line, so the image installs the project's own pins.

    python requirements.py pyproject.toml --torch   # torch, torchvision (installed from the torch index)
    python requirements.py pyproject.toml           # everything else (from PyPI)
"""

import re
import sys
import tomllib

TORCH_PACKAGES = ("torch", "torchvision")


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    want_torch = "--torch" in sys.argv[2:]
    for dep in deps:
        name = re.split(r"[\s;\[<>=!~]", dep, maxsplit=1)[0]
        if (name in TORCH_PACKAGES) == want_torch:
            print(dep)


if __name__ == "__main__":
    main()
