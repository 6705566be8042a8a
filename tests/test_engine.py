"""The engine with real kernels, on every backend (the `backend` fixture is parametrized)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import psutil
import pytest

from kernelbox_server.sandbox.backends.base import KernelConfig, Limits
from kernelbox_server.sandbox.backends.local import LocalBackend
from kernelbox_server.sandbox.errors import SessionBusy
from kernelbox_server.sandbox.session import KernelSession, SessionOptions
from tests.support import make_backend


@pytest.fixture(scope="session")
async def shared(backend, tmp_path_factory):
    """One long-lived session for tests that do not break their kernel."""
    session = await KernelSession.start(backend, _workdir(tmp_path_factory))
    yield session
    await session.close()


@pytest.fixture
async def fresh(backend, tmp_path_factory):
    """A session of its own, for tests that time out, kill or restart the kernel."""
    session = await KernelSession.start(
        backend, _workdir(tmp_path_factory), options=SessionOptions(interrupt_grace=1.0)
    )
    yield session
    await session.close()


def _workdir(factory) -> Path:
    path = factory.mktemp("session") / "work"
    path.mkdir()
    return path


async def test_variables_persist_across_executes(shared):
    assert (await shared.execute("persist_me = 41")).status == "ok"
    result = await shared.execute("persist_me + 1")
    assert result.status == "ok"
    assert result.results[0].data["text/plain"] == "42"


async def test_preloaded_stack_and_working_directory(shared):
    code = (
        "import os, matplotlib\n"
        "print(np.__name__, pd.__name__, plt.__name__, matplotlib.get_backend())\n"
        "print(os.getcwd())"
    )
    result = await shared.execute(code)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("numpy pandas matplotlib.pyplot")
    assert "inline" in lines[0]
    assert os.path.basename(lines[1]) == "work"


async def test_every_output_kind_lands_in_its_field(shared):
    code = (
        "import sys\n"
        "from IPython.display import display, HTML\n"
        "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "display(HTML('<b>bold</b>'))\n"
        "'the result'"
    )
    result = await shared.execute(code)
    assert result.status == "ok"
    assert result.stdout == "to stdout\n"
    assert result.stderr == "to stderr\n"
    display, value = result.results
    assert display.type == "display_data"
    assert display.data["text/html"] == "<b>bold</b>"
    assert "text/plain" in display.data
    assert value.type == "execute_result"
    assert value.data["text/plain"] == "'the result'"
    assert result.execution_count and result.execution_count > 0
    assert [o.type for o in result.outputs] == ["stream", "stream", "result", "result"]


async def test_error_fields_are_ansi_free_and_minimal(shared):
    result = await shared.execute("def f():\n    return 1 / 0\nf()")
    assert result.status == "error"
    assert result.error.name == "ZeroDivisionError"
    assert result.error.value == "division by zero"
    assert result.error.traceback
    assert not any("\x1b" in line for line in result.error.traceback)
    # %xmode Minimal: only the exception line, no frames
    assert "".join(result.error.traceback).strip() == "ZeroDivisionError: division by zero"


async def test_plot_writes_png_numbered_across_the_session(shared):
    first = await shared.execute("plt.plot([1, 2, 3]); plt.show()")
    second = await shared.execute("plt.figure(); plt.bar([1], [2]); plt.show()")
    paths = [img.path for img in first.images + second.images]
    assert len(paths) == 2
    assert all(p.startswith("outputs/fig-") and p.endswith(".png") for p in paths)
    assert paths[0] != paths[1]
    n1, n2 = (int(p.split("-")[1].split(".")[0]) for p in paths)
    assert n2 == n1 + 1
    for p in paths:
        data = (shared.workdir / p).read_bytes()
        assert data.startswith(b"\x89PNG")
    assert first.images[0].mime == "image/png"
    assert first.results[0].images == [paths[0]]


async def test_jpeg_and_svg_images_are_saved(shared):
    code = (
        "from IPython.display import display, SVG, Image\n"
        "import io\n"
        "from PIL import Image as P\n"
        "buf = io.BytesIO(); P.new('RGB', (4, 4), 'red').save(buf, 'JPEG')\n"
        "display(Image(buf.getvalue(), format='jpeg'))\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\'))'
    )
    result = await shared.execute(code)
    assert result.status == "ok", result.error
    mimes = sorted(img.mime for img in result.images)
    assert mimes == ["image/jpeg", "image/svg+xml"]
    for img in result.images:
        assert (shared.workdir / img.path).stat().st_size > 0


async def test_image_is_not_written_through_a_planted_symlink(shared, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    code = (
        "import os, shutil\n"
        "shutil.move('outputs', 'outputs-old') if os.path.isdir('outputs') else None\n"
        f"os.symlink({str(outside)!r}, 'outputs')\n"
        "plt.plot([1]); plt.show()"
    )
    try:
        result = await shared.execute(code)
        assert list(outside.iterdir()) == []
        assert result.images == []
        assert result.truncated  # the lost image is reported
    finally:
        await shared.execute(
            "os.unlink('outputs')\n"
            "shutil.move('outputs-old', 'outputs') if os.path.isdir('outputs-old') else None"
        )


async def test_carriage_returns_and_clear_output(shared):
    progress = await shared.execute(
        "import sys\n"
        "for i in range(5):\n    sys.stdout.write(f'\\r{i * 25}%')\n"
        "print()\nprint('done')"
    )
    assert progress.stdout == "100%\ndone\n"
    cleared = await shared.execute(
        "from IPython.display import clear_output\nprint('old')\nclear_output()\nprint('new')"
    )
    assert cleared.stdout == "new\n"


async def test_input_raises_a_clear_error(shared):
    result = await shared.execute("input('name? ')")
    assert result.status == "error"
    assert "input() is disabled" in result.error.value


async def test_deadline_interrupts_and_keeps_state(fresh):
    await fresh.execute("kept = 'still here'")
    started = time.monotonic()
    result = await fresh.execute("while True: pass", timeout=1)
    elapsed = time.monotonic() - started
    assert result.status == "timeout"
    assert elapsed < 1.5, elapsed
    assert not result.kernel_restarted
    assert (await fresh.execute("kept")).results[0].data["text/plain"] == "'still here'"


async def test_sigint_ignoring_code_is_restarted_within_deadline_plus_grace(fresh):
    await fresh.execute("lost = 1")
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    started = time.monotonic()
    result = await fresh.execute(code, timeout=1)
    elapsed = time.monotonic() - started
    assert result.status == "timeout"
    assert result.kernel_restarted
    assert elapsed < 1 + fresh.options.interrupt_grace + 0.5, elapsed
    after = await fresh.execute("'lost' in globals()")
    assert after.results[0].data["text/plain"] == "False"


async def test_os_exit_reports_died_and_next_execute_works(fresh):
    result = await fresh.execute("print('before'); import os; os._exit(1)")
    assert result.status == "died"
    assert result.kernel_restarted
    assert "lost" in result.error.value
    assert "exited with code 1" in result.error.value
    again = await fresh.execute("1 + 1")
    assert again.status == "ok"
    assert again.results[0].data["text/plain"] == "2"
    assert not again.kernel_restarted


async def test_segfault_reports_died(fresh):
    result = await fresh.execute("import ctypes; ctypes.string_at(0)")
    assert result.status == "died"
    assert "SIGSEGV" in result.error.value or "139" in result.error.value


async def test_death_while_idle_is_reported_on_the_next_execute(fresh):
    await fresh.execute("import os, threading\nthreading.Timer(0.2, lambda: os._exit(3)).start()")
    await asyncio.sleep(1.0)
    result = await fresh.execute("'fresh' if 'os' in globals() else 'gone'")
    assert result.status == "ok"
    assert result.kernel_restarted


async def test_second_caller_gets_busy(fresh):
    running = asyncio.create_task(fresh.execute("import time; time.sleep(1)"))
    await asyncio.sleep(0.2)
    with pytest.raises(SessionBusy):
        await fresh.execute("1")
    assert (await running).status == "ok"


async def test_restart_clears_state_keeps_files(fresh):
    await fresh.execute("x = 5\nopen('keep.txt', 'w').write('kept')")
    await fresh.restart()
    result = await fresh.execute("print('x' in globals(), open('keep.txt').read())")
    assert result.stdout == "False kept\n"


async def test_interrupt_stops_running_code(fresh):
    running = asyncio.create_task(fresh.execute("import time; time.sleep(30)", timeout=60))
    await asyncio.sleep(0.5)
    assert await fresh.interrupt()
    result = await asyncio.wait_for(running, 5)
    assert result.status == "error"
    assert result.error.name == "KeyboardInterrupt"


def _rss() -> int:
    return psutil.Process().memory_info().rss


async def test_what_a_cell_printed_is_not_kept_in_the_kernel(fresh):
    """Half a gigabyte printed in 100 kB writes: the kernel keeps none of it (IPython 9 would
    keep it all, as output history)."""
    code = (
        "import resource\nline = 'y' * 100_000\nfor _ in range(5000):\n    print(line)\n"
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
    )
    printed = await fresh.execute(code, timeout=120)
    assert printed.status == "ok", printed.error
    peak = int(printed.results[0].data["text/plain"])
    assert peak < 400 * 1024**2, f"the kernel grew to {peak >> 20} MiB"


async def test_output_flood_is_truncated_and_host_memory_bounded(fresh):
    cap = fresh.options.capture.max_chars
    before = _rss()
    big = await fresh.execute("print('x' * 10**8)", timeout=60)
    assert big.status == "ok"
    assert big.truncated
    assert len(big.stdout) < cap + 100
    assert "characters truncated]..." in big.stdout
    dropped = int(big.stdout.split("...[")[1].split(" ")[0])
    assert dropped + len(big.stdout) - len(f"...[{dropped} characters truncated]...") == 10**8 + 1
    # A thousand numbered lines per print: far past the cap within the deadline, even on a
    # loaded machine where the kernel gets little CPU.
    endless = (
        "i = 0\nwhile True:\n"
        "    print('\\n'.join(f'{j} ' + 'y' * 100 for j in range(i, i + 1000)))\n"
        "    i += 1000"
    )
    loop = await fresh.execute(endless, timeout=5)
    assert loop.status == "timeout", loop.error
    assert loop.truncated
    assert len(loop.stdout) < cap + 100
    # The head is the oldest output, the tail the newest: far more lines ran than were kept.
    numbers = [
        int(line.split()[0]) for line in loop.stdout.splitlines() if line.endswith("y" * 100)
    ]
    assert numbers[0] == 0
    assert numbers[-1] > 10 * len(numbers)
    grown = _rss() - before
    assert grown < 40 * 1024**2, f"host grew by {grown / 2**20:.1f} MiB"


async def test_fd_output_written_as_a_cell_ends_is_in_its_result(shared):
    """What code writes to fd 1 (C code, os.write) reaches the kernel through a pipe that a
    thread of ipykernel reads: the cell's end waits for it to be read. One large write leaves
    up to a pipe's worth unread when it returns."""
    for _ in range(3):
        result = await shared.execute("import os\nos.write(1, b'x' * 1_000_000 + b'END\\n')")
        assert result.status == "ok", result.error
        assert result.stdout.rstrip().endswith("xEND"), result.stdout[-200:]


async def test_bad_input_gets_a_clear_result(shared):
    empty = await shared.execute("   \n")
    assert empty.status == "ok" and empty.execution_count is None
    raw = await shared.execute(
        "import os, sys; sys.stdout.flush(); os.write(1, b'ok\\xff\\xfe\\n')"
    )
    assert raw.status == "ok"
    assert "ok" in raw.stdout and "\ufffd" in raw.stdout
    surrogate = await shared.execute("print('bad \\udcff char')")
    assert surrogate.status in ("ok", "error")
    surrogate.model_dump_json()  # always serialisable
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            await shared.execute("1", timeout=bad)


async def test_kernel_environment_is_scrubbed(backend, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KERNELBOX_TEST_SECRET", "hunter2")
    session = await KernelSession.start(backend, _workdir(tmp_path_factory))
    try:
        result = await session.execute(
            "import os\nprint(os.environ.get('KERNELBOX_TEST_SECRET'))\n"
            "print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('OPENBLAS_NUM_THREADS'))"
        )
        assert result.stdout == "None\n1 1\n"
    finally:
        await session.close()


async def test_local_backend_limits_and_network(tmp_path_factory):
    backend = LocalBackend()
    session = await KernelSession.start(backend, _workdir(tmp_path_factory))
    try:
        result = await session.execute(
            "import resource\n"
            "print(resource.getrlimit(resource.RLIMIT_AS)[0],\n"
            "      resource.getrlimit(resource.RLIMIT_FSIZE)[0])\n"
            "import socket\n"
            "try:\n"
            "    socket.create_connection(('1.1.1.1', 53), timeout=2); print('connected')\n"
            "except OSError as e:\n"
            "    print('blocked', e.errno)"
        )
    finally:
        await session.close()
        await backend.close()
    as_limit, fsize, *_ = result.stdout.split()
    assert int(as_limit) == 2 * 1024**3
    assert int(fsize) == 1024**3
    assert "blocked" in result.stdout  # this machine allows a private network namespace


async def test_filling_the_disk_stops_at_the_quota(backend_name, tmp_path_factory):
    limits = dataclasses.replace(Limits(), disk_bytes=50 * 1024**2)
    quota_backend = make_backend(backend_name, KernelConfig(limits=limits))
    session = await KernelSession.start(quota_backend, _workdir(tmp_path_factory))
    try:
        code = (
            "import os, time\n"
            "chunk = b'x' * 1024**2\n"
            "i = 0\n"
            "while True:\n"
            "    with open(f'fill-{i}.bin', 'wb') as f:\n"
            "        f.write(chunk * 4)\n"
            "    i += 1\n"
            "    time.sleep(0.01)"
        )
        result = await session.execute(code, timeout=30)
        assert result.status == "error", result
        assert result.error.name == "DiskQuotaExceeded"
        assert result.duration_ms < 10_000
        cleanup = await session.execute(
            "import glob\nfor p in glob.glob('fill-*.bin'): os.remove(p)\nlen(glob.glob('fill-*'))"
        )
        assert cleanup.status == "ok" and cleanup.results[0].data["text/plain"] == "0"
    finally:
        await session.close()
        await quota_backend.close()
