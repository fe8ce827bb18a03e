"""The benchmark names the CPU's microarchitecture: the limits differ twofold between Zen 4 and Zen 5."""

from bench.machine import CPU_FLAGS
from bench.machine import amd_microarchitecture as _amd_microarchitecture
from bench.machine import cpu_identity as _cpu_identity


def test_amd_family_and_model_name_the_microarchitecture() -> None:
    assert _amd_microarchitecture("AuthenticAMD", 0x19, 0x11) == "Zen 4"  # EPYC 9004 (Genoa)
    assert _amd_microarchitecture("AuthenticAMD", 0x19, 0x01) == "Zen 3"  # EPYC 7003 (Milan)
    assert _amd_microarchitecture("AuthenticAMD", 0x1A, 0x02) == "Zen 5"  # EPYC 9005 (Turin)
    assert _amd_microarchitecture("GenuineIntel", 6, 143) == "unknown"


def test_cpu_identity_reads_this_machine() -> None:
    identity = _cpu_identity()
    assert isinstance(identity["name"], str)
    if "family" in identity:  # Linux: /proc/cpuinfo was read
        assert identity["family"] >= 0 and identity["model"] >= 0
        assert set(identity["flags"]) <= CPU_FLAGS
