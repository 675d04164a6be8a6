"""`make train`'s CPU settings: devices per core, bfloat16 only with bfloat16 units, huge-page malloc."""

import os
import subprocess
import sys

import pytest

from sentiment_jax import cpu_setup
from test_train import REPO

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile
bogomips\t: 4000.00

processor\t: 1
model name\t: Some CPU
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16
"""


def test_flags_are_those_every_processor_reports():
    assert cpu_setup.cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512_bf16"}
    assert cpu_setup.cpu_flags("processor : 0\n") == set()


def test_choice_by_cores_and_flags():
    huge_pages = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert cpu_setup.choose(2, {"avx2", "fma"}) == {"cpu_devices": 2, "dtype": "float32", "lstm_backend": "auto",
                                                   "malloc": huge_pages}
    assert cpu_setup.choose(6, {"avx512_bf16"})["cpu_devices"] == 4  # a power of two divides the batch
    assert cpu_setup.choose(1, {"amx_bf16"}) == {"cpu_devices": 1, "dtype": "bfloat16", "lstm_backend": "auto",
                                                "malloc": huge_pages}
    assert cpu_setup.choose(2, {"avx2"}, jemalloc_path="/lib/libjemalloc.so.2")["malloc"] == {
        "LD_PRELOAD": "/lib/libjemalloc.so.2", "MALLOC_CONF": cpu_setup.JEMALLOC_CONF}
    assert cpu_setup.choose(16, {"avx512f", "avx512_vnni"})["dtype"] == "float32"  # AVX-512 without BF16
    # An LSTM on the CPU kernel: JAX's one multi-threaded device (0: no --cpu_devices added).
    assert cpu_setup.choose(2, {"avx2"}, lstm_kernel=True)["cpu_devices"] == 0


def test_an_instruction_set_cap_leaves_out_newer_flags(monkeypatch):
    level = [name for name, _, _ in cpu_setup.ISA_LEVELS].index
    flags = {"sse4_2", "avx", "f16c", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "fpu"}
    assert cpu_setup.capped(flags, level("AVX2")) == {"sse4_2", "avx", "f16c", "avx2", "fma", "fpu"}
    assert cpu_setup.capped(flags, level("AVX512")) == {"sse4_2", "avx", "f16c", "avx2", "fma", "avx512f", "avx512bw",
                                                        "fpu"}
    assert cpu_setup.capped(flags, level("AMX")) == flags
    assert cpu_setup.choose(2, cpu_setup.capped(flags, level("AVX512_VNNI")))["dtype"] == "float32"
    assert cpu_setup.choose(2, cpu_setup.capped(flags, level("AVX512_BF16")))["dtype"] == "bfloat16"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=avx2")
    assert cpu_setup.isa_cap() == level("AVX2")
    assert cpu_setup.compiler_isa_flags() == ["-mno-avx512f", "-mno-avx512vnni", "-mno-avx512bf16", "-mno-amx-tile"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=NEWEST")  # XLA ignores a level it does not know
    assert cpu_setup.isa_cap() == level("AMX") and cpu_setup.compiler_isa_flags() == []
    monkeypatch.delenv("XLA_FLAGS")
    assert cpu_setup.isa_cap() == level("AMX")


def test_the_model_is_read_from_the_command_config():
    assert cpu_setup.config_model(["python", f"--config={REPO}/configs/lstm.py"]) == "lstm"
    assert cpu_setup.config_model(["python", f"--config={REPO}/configs/transformer.py:nusax"]) == "transformer"
    assert cpu_setup.config_model(["python", f"--config={REPO}/configs/lstm.py", "--config.model.name=gru"]) == "gru"
    assert cpu_setup.config_model(["python", "--config=configs/missing.py"]) is None
    assert cpu_setup.config_model(["python", "-c", "pass"]) is None


def test_what_the_command_or_environment_gives_is_kept():
    settings = cpu_setup.choose(2, {"avx512_bf16"})
    command, env = cpu_setup.apply(["python", "--cpu_devices=8"], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                   settings)
    assert command == ["python", "--cpu_devices=8", "--config.model.dtype=bfloat16", "--config.model.lstm_backend=auto"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    command, env = cpu_setup.apply(["python", "--config.model.dtype=float32", "--config.model.lstm_backend=scan"],
                                   {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, settings)
    assert command == ["python", "--config.model.dtype=float32", "--config.model.lstm_backend=scan", "--cpu_devices=2"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    command, _ = cpu_setup.apply(["python"], {}, cpu_setup.choose(2, {"avx2"}, lstm_kernel=True))
    assert command == ["python", "--config.model.dtype=float32", "--config.model.lstm_backend=auto"]
    jemalloc = cpu_setup.choose(2, {"avx2"}, jemalloc_path="/lib/libjemalloc.so.2")
    _, env = cpu_setup.apply(["python"], {"LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                             jemalloc)
    assert env == {"LD_PRELOAD": "/lib/libjemalloc.so.2:libfoo.so", "MALLOC_CONF": cpu_setup.JEMALLOC_CONF,
                   "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    for chosen in ({"LD_PRELOAD": "/opt/libtcmalloc.so"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}):
        assert cpu_setup.apply(["python"], chosen, jemalloc)[1] == chosen  # an allocator the environment chose


@pytest.mark.skipif(cpu_setup.has_nvidia_gpu() or "GLIBC_TUNABLES" in os.environ or "LD_PRELOAD" in os.environ,
                    reason="CPU settings are added only on a CPU machine, to an environment without tunables")
def test_runs_the_command_with_the_settings_of_this_machine():
    show = "import os, sys; print(os.environ.get('MALLOC_CONF') or os.environ['GLIBC_TUNABLES'], *sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-m", "sentiment_jax.cpu_setup", "--", sys.executable, "-c", show, "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = cpu_setup.choose(len(os.sched_getaffinity(0)), cpu_setup.machine_flags(),
                                jemalloc_path=cpu_setup.jemalloc())
    malloc = expected["malloc"].get("MALLOC_CONF") or expected["malloc"]["GLIBC_TUNABLES"]
    assert proc.stdout.split() == [malloc, "x", f"--cpu_devices={expected['cpu_devices']}",
                                   f"--config.model.dtype={expected['dtype']}", "--config.model.lstm_backend=auto"]
    assert proc.stderr.startswith("cpu_setup: ") and proc.stderr.count("\n") == 1
