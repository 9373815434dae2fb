"""Energy of a node's work (issue 13.4): measured where the machine exposes it, estimated otherwise.

A department node meters each train and evaluate task of its own process
(:class:`EnergyMeter`) and adds two numbers to its reply (:data:`contract.energy.ENERGY_METRICS`):

``energy-j``
    joules used by the task, two significant figures;
``energy-method``
    how it was obtained (:data:`contract.energy.METHODS`):

    * CPU: **measured** from Intel/AMD RAPL package counters
      (``/sys/class/powercap/intel-rapl:*/energy_uj``) where they are readable - the whole
      CPU package, so other work on the machine during the task counts too; else
      **estimated** as the process's CPU time (user + system, all its threads, from
      ``getrusage``) × a stated power per busy core: :data:`DEFAULT_WATTS_PER_CORE` W, or
      ``$CITYFED_CPU_WATTS_PER_CORE`` (set it from the machine's datasheet: TDP ÷ cores);
    * GPU: **measured** with NVML's energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
      Volta and later) when the task ran on CUDA and ``pynvml`` is installed; not counted
      otherwise.

Is it a release? No record value enters it, but it is computed from the task's compute, which
follows the site's exact record count and, under DP-SGD's Poisson sampling, each round's realised
batch sizes (the subsampling analysis of the accountant assumes they stay hidden). The reply's
steps and record count derive from the released, noised count (:mod:`clients.counts`); this
figure does not, it is not accounted in the ledger, and one figure per reply lets a coordinator
average it over rounds (which also undoes the two-significant-figure rounding). So it leaves only
when the node's own policy opts in (``[releases] energy = "sent"``, default ``"off"``), and
``$CITYFED_ENERGY=off`` on the node turns it off whatever the policy says.
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path

from contract.energy import ENERGY_METRICS

#: Stated power of one fully busy CPU core (W) for the estimate, unless ``$CITYFED_CPU_WATTS_PER_CORE``.
#: About a server CPU's TDP per core (e.g. 180 W / 32 cores = 5.6 W); an assumption, not a measurement.
DEFAULT_WATTS_PER_CORE = 6.0
#: Environment: power per busy core for the estimate.
ENV_WATTS = "CITYFED_CPU_WATTS_PER_CORE"
#: Environment: ``off`` = send no energy figures.
ENV_SWITCH = "CITYFED_ENERGY"
#: Where Linux exposes RAPL.
POWERCAP = Path("/sys/class/powercap")


def watts_per_core() -> float:
    """The power per busy core used by the estimate (``$CITYFED_CPU_WATTS_PER_CORE`` or the default).

    Raises
    ------
    ValueError
        When the variable is set to something that is not a positive number (names it and the fix).
    """
    raw = os.environ.get(ENV_WATTS)
    if raw is None or raw.strip() == "":
        return DEFAULT_WATTS_PER_CORE
    try:
        w = float(raw)
    except ValueError:
        w = float("nan")
    if not (w > 0 and math.isfinite(w)):
        raise ValueError(f"${ENV_WATTS}={raw!r}: expected watts per busy core, a positive number such as 6.0 "
                         "(the CPU's TDP divided by its cores); fix: set it so, or unset it for the default")
    return w


def rapl_domains(root: Path = POWERCAP) -> list[Path]:
    """Readable top-level RAPL package domains (``intel-rapl:N``; AMD exposes the same names)."""
    out = []
    try:
        cands = sorted(root.glob("intel-rapl:*"))
    except OSError:
        return []
    for d in cands:
        if d.name.count(":") != 1:  # sub-domains (core, dram) are inside the package figure
            continue
        try:
            int((d / "energy_uj").read_text())
            out.append(d)
        except (OSError, ValueError):
            continue
    return out


def _rapl_read(domains: list[Path]) -> list[int]:
    return [int((d / "energy_uj").read_text()) for d in domains]


def _rapl_joules(domains: list[Path], start: list[int], end: list[int]) -> float:
    total = 0
    for d, a, b in zip(domains, start, end):
        if b < a:  # the counter wrapped
            try:
                b += int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
        total += b - a
    return total / 1e6


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _nvml_handle():
    """An NVML handle of the current CUDA device, or None (no CUDA, no pynvml, no counter)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import pynvml

        pynvml.nvmlInit()
        idx = torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(idx)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # raises on GPUs without the counter
        return h
    except Exception:  # noqa: BLE001 - no GPU energy then; the CPU part is still reported
        return None


def sig2(x: float) -> float:
    """``x`` rounded to two significant figures."""
    if x <= 0 or not math.isfinite(x):
        return 0.0
    return round(x, 1 - int(math.floor(math.log10(x))))


class EnergyMeter:
    """Energy of the work done inside ``with EnergyMeter() as m:`` by this process.

    Parameters
    ----------
    powercap : Path
        Where RAPL is looked for (``/sys/class/powercap``).
    gpu : bool
        Also read NVML's energy counter when CUDA and ``pynvml`` are there.

    Attributes
    ----------
    joules : float
        Energy of the block (after it ends), unrounded.
    method : int
        :data:`contract.energy.METHODS` code.
    cpu_seconds : float
        Process CPU time spent in the block.
    """

    def __init__(self, powercap: Path = POWERCAP, gpu: bool = True):
        self.powercap, self.gpu = Path(powercap), gpu
        self.joules, self.method, self.cpu_seconds = 0.0, 1, 0.0

    def __enter__(self) -> "EnergyMeter":
        self._domains = rapl_domains(self.powercap)
        try:
            self._rapl0 = _rapl_read(self._domains)
        except (OSError, ValueError):
            self._domains, self._rapl0 = [], []
        self._watts = watts_per_core()  # a bad setting fails here, before the task's work
        self._nvml = _nvml_handle() if self.gpu else None
        self._gpu0 = self._gpu_mj()
        self._cpu0 = _cpu_seconds()
        return self

    def _gpu_mj(self) -> int | None:
        if self._nvml is None:
            return None
        try:
            import pynvml

            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml))
        except Exception:  # noqa: BLE001
            return None

    def __exit__(self, *exc) -> None:
        self.cpu_seconds = max(0.0, _cpu_seconds() - self._cpu0)
        cpu_j = None
        if self._domains:
            try:
                cpu_j = _rapl_joules(self._domains, self._rapl0, _rapl_read(self._domains))
            except (OSError, ValueError):
                cpu_j = None
        measured_cpu = cpu_j is not None
        if cpu_j is None:
            cpu_j = self.cpu_seconds * self._watts
        gpu1 = self._gpu_mj()
        gpu_j = (gpu1 - self._gpu0) / 1e3 if gpu1 is not None and self._gpu0 is not None else None
        self.joules = cpu_j + (gpu_j or 0.0)
        self.method = (0 if measured_cpu else 1) + (2 if gpu_j is not None else 0)

    def metrics(self, policy_setting: str = "sent") -> dict[str, float | int]:
        """The reply's energy keys (:data:`contract.energy.ENERGY_METRICS`), or ``{}``.

        Parameters
        ----------
        policy_setting : str
            The node policy's ``[releases] energy``: ``"sent"`` or ``"off"``. Nothing is returned
            unless it is ``"sent"``, nor when ``$CITYFED_ENERGY=off``.
        """
        if policy_setting != "sent":
            return {}
        if os.environ.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
            return {}
        joules_key, method_key = ENERGY_METRICS
        return {joules_key: sig2(self.joules), method_key: int(self.method)}
