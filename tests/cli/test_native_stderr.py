"""The CLI's filter for TensorFlow's native start-up lines on file descriptor 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tlsweep.cli._native_stderr import LineFilter

# What TensorFlow 2.21 printed on this machine for `import tensorflow` and the first device
# lookup, whatever TF_CPP_MIN_LOG_LEVEL said.
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1795934439.516132   10787 port.cc:153] oneDNN custom operations are on. You "
    b"may see slightly different numerical results due to floating-point round-off errors from "
    b"different computation orders. To turn them off, set the environment variable "
    b"`TF_ENABLE_ONEDNN_OPTS=0`.",
    b"I0000 00:00:1795934439.516518   10787 cudart_stub.cc:31] Could not find cuda drivers on "
    b"your machine, GPU will not be used.",
    b"I0000 00:00:1795934498.667291   11239 cpu_feature_guard.cc:227] This TensorFlow binary is "
    b"optimized to use available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other "
    b"operations, rebuild TensorFlow with the appropriate compiler flags.",
    b"E0000 00:00:1795934442.688264   10794 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    b"E0000 00:00:1795934442.688264   10794 jpeg_mem.cc:331] Premature end of JPEG data. "
    b"Possibly due to a truncated file.",
]
KEPT = [
    b"E0000 00:00:1795934442.688264   10794 op_kernel.cc:1857] OP_REQUIRES failed: out of memory",
    b"F0000 00:00:1795934442.688264   10794 check.cc:9] Check failed: x == y",
    b"Traceback (most recent call last):",
    b"I0000 00:00 is not a log record",
    b"WARNING: something else entirely",
    b"Example text named I0000 in the middle",
    "une ligne accentuée".encode(),
    b"",
]


def _mixed() -> tuple[bytes, bytes]:
    lines = [x for pair in zip(NOISE, KEPT, strict=False) for x in pair] + KEPT[len(NOISE) :]
    data = b"".join(line + b"\n" for line in lines)
    return data, b"".join(line + b"\n" for line in KEPT)


@pytest.mark.parametrize("step", [1, 7, 64, 100_000])
def test_noise_lines_dropped_and_everything_else_kept(step: int) -> None:
    data, expected = _mixed()
    f = LineFilter()
    out = b"".join(f.feed(data[i : i + step]) for i in range(0, len(data), step)) + f.flush()
    assert out == expected


def test_a_progress_bar_passes_at_once() -> None:
    f = LineFilter()
    assert (
        f.feed(b"\rextract MobileNetV2 96px avg:  13%") == b"\rextract MobileNetV2 96px avg:  13%"
    )
    assert (
        f.feed(b"\rextract MobileNetV2 96px avg:  14%") == b"\rextract MobileNetV2 96px avg:  14%"
    )
    assert f.feed(b"\n") == b"\n"


def test_an_unfinished_line_that_may_be_noise_is_held_then_given_up() -> None:
    f = LineFilter()
    assert f.feed(b"I0000 00:00:17 12 cudart_") == b""  # may still be the CUDA notice
    assert f.holding
    assert f.flush() == b"I0000 00:00:17 12 cudart_"  # given up on: passed on as it is
    assert f.feed(b"stub.cc:31] rest of it\nnext\n") == b"stub.cc:31] rest of it\nnext\n"
    assert f.feed(b"I0000 00:00:17 12 kernel") == b"I0000 00:00:17 12 kernel"  # cannot be noise


def _child(code: str) -> subprocess.CompletedProcess:
    prelude = (
        "import os, sys\n"
        "from tlsweep.cli import _native_stderr as native_stderr\n"
        "assert native_stderr.install()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        timeout=60,
    )


def test_install_filters_native_writes_and_keeps_python_stderr() -> None:
    data, expected = _mixed()
    r = _child(
        f"""
        os.write(2, {data!r})
        print("from python", file=sys.stderr)
        """
    )
    assert r.returncode == 0, r.stderr
    assert b"from python\n" in r.stderr
    assert r.stderr.replace(b"from python\n", b"") == expected


def test_last_native_words_survive_an_abort() -> None:
    words = NOISE[2] + b"\n" + b"F0000 fatal: the last words\n"
    r = _child(
        f"""
        os.write(2, {words!r})
        os.abort()
        """
    )
    assert r.returncode != 0
    assert r.stderr == b"F0000 fatal: the last words\n"


def test_child_processes_write_through_the_same_filter() -> None:
    line = NOISE[5] + b"\n"
    noisy = f"import os; os.write(2, {line!r})"
    plain = "import os; os.write(2, b'child says hi\\n')"
    r = _child(
        f"""
        import subprocess
        subprocess.run([sys.executable, "-c", {noisy!r}])
        subprocess.run([sys.executable, "-c", {plain!r}])
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"child says hi\n"


def test_everything_is_out_when_the_process_has_ended(tmp_path) -> None:
    """Native lines reach a stderr *file* before the process ends (restore waits for them),
    and the host gets its descriptor 2 and sys.stderr back."""
    code = textwrap.dedent(
        """
        import os, sys
        from tlsweep.cli import _native_stderr as native_stderr
        before = sys.stderr
        restore = native_stderr.install()
        assert restore is not None
        os.write(2, b"native one\\n")
        print("python one", file=sys.stderr, flush=True)
        restore()
        assert sys.stderr is before and not os.environ.get(native_stderr.ENV_FLAG)
        os.write(2, b"after restore\\n")
        """
    )
    err = tmp_path / "err.txt"
    with err.open("wb") as f:
        r = subprocess.run([sys.executable, "-c", code], stderr=f, timeout=60)
    assert r.returncode == 0, err.read_bytes()
    assert sorted(err.read_bytes().splitlines()) == [b"after restore", b"native one", b"python one"]
    assert err.read_bytes().endswith(b"after restore\n")


def test_no_descriptor_2_is_not_an_error() -> None:
    code = (
        "import sys\n"
        "from tlsweep.cli import _native_stderr as native_stderr\n"
        "print(native_stderr.install())\n"
    )
    r = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -c "$0" 2>&-', code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout == "None\n"
