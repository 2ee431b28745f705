"""Which cluster this process runs on, and starting the multi-process JAX runtime on it.

`detect` reads the environment variables that jax.distributed's own cluster detection reads
(jax/_src/clusters, private, so mirrored here and checked against it by tests/test_cluster.py), in
jax's order: explicit flags, Open MPI, SLURM, GKE TPU, a Cloud TPU VM, a Kubernetes indexed Job. It
fails fast on a half-set environment, naming the variable that is missing, where jax would hang
waiting for peers or quietly start one process alone. `initialize` then lets jax detect the rest
itself (the Kubernetes API and the TPU metadata server are only reachable through jax).
"""

import dataclasses
import glob
import logging
import os
import re
from typing import Mapping, Optional

log = logging.getLogger("flaxhf")

# jax/_src/clusters: the coordinator port of each kind when JAX_COORDINATOR_PORT is unset.
_TPU_PORT, _K8S_PORT = 8482, 55527
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# jax/_src/hardware_utils.py: Google's PCI vendor id and the device ids of TPU chips.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_SLURM_NEEDS = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


class ClusterError(RuntimeError):
  """The environment describes a cluster, but not completely or not consistently."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What `detect` found; None where only jax can tell (Kubernetes API, TPU metadata server)."""

  kind: str  # none | flags | ompi | slurm | gke_tpu | tpu_vm | kubernetes
  num_processes: Optional[int] = 1
  process_id: Optional[int] = 0
  coordinator: Optional[str] = None
  source: str = ""  # the variables it was read from, for logs
  # SLURM with one task per node: every local GPU is this process's (jax's default is one per task).
  all_local_devices: bool = False

  @property
  def multi_process(self) -> bool:
    return self.kind != "none" and self.num_processes != 1

  def describe(self) -> str:
    where = f" ({self.source})" if self.source else ""
    coord = f", coordinator {self.coordinator}" if self.coordinator else ""
    return f"{self.kind}{where}{coord}"


def detect(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
           process_id: Optional[int] = None, environ: Optional[Mapping[str, str]] = None,
           sysfs: str = "/sys") -> Cluster:
  """The cluster this process belongs to, from flags or the environment; raises ClusterError."""
  env = os.environ if environ is None else environ
  flags = (coordinator_address, num_processes, process_id)
  if any(f is not None for f in flags):
    if None in flags:
      raise ClusterError("--coordinator_address, --num_processes and --process_id go together; "
                         "pass all three, or none on a cluster that is detected.")
    if not 0 <= process_id < num_processes:
      raise ClusterError(f"--process_id={process_id} must be in [0, --num_processes="
                         f"{num_processes}).")
    return Cluster("flags", num_processes, process_id, coordinator_address, "command-line flags")
  port = env.get("JAX_COORDINATOR_PORT")
  for kind in (_ompi, _slurm, _gke_tpu, lambda e, p: _tpu_vm(e, sysfs), _kubernetes):
    cluster = kind(env, port)
    if cluster is not None:
      return cluster
  return Cluster("none", source="no cluster environment")


def _int(env, name, kind) -> int:
  try:
    return int(env[name])
  except KeyError:
    raise ClusterError(f"{kind}: {name} is not set.") from None
  except ValueError:
    raise ClusterError(f"{kind}: {name}={env[name]!r} is not an integer.") from None


def _ompi(env, port) -> Optional[Cluster]:
  size = env.get("OMPI_COMM_WORLD_SIZE")
  if "OMPI_MCA_orte_hnp_uri" not in env:
    if size and int(size) > 1:
      raise ClusterError(
          f"Open MPI: OMPI_COMM_WORLD_SIZE={size} but OMPI_MCA_orte_hnp_uri is not set (Open MPI 5 "
          "no longer sets it, and jax reads the coordinator from it): pass --coordinator_address="
          "HOST:PORT --num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK.")
    return None
  uri = env["OMPI_MCA_orte_hnp_uri"]  # e.g. 1531576320.0;tcp://10.96.0.1,10.148.0.1:34911
  match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
  if match is None:
    raise ClusterError(f"Open MPI: no coordinator host in OMPI_MCA_orte_hnp_uri={uri!r}.")
  host = next(g for g in match.groups() if g is not None)
  port = port or str(int(uri.split(".", 1)[0]) // 2**12 % 2**12 + 65535 - 2**12 + 1)
  n, i = _int(env, "OMPI_COMM_WORLD_SIZE", "Open MPI"), _int(env, "OMPI_COMM_WORLD_RANK", "Open MPI")
  return Cluster("ompi", n, i, f"{host}:{port}", "OMPI_COMM_WORLD_SIZE/RANK")


def _slurm(env, port) -> Optional[Cluster]:
  if "SLURM_JOB_ID" not in env:
    return None
  ntasks = _int(env, "SLURM_NTASKS", "SLURM") if "SLURM_NTASKS" in env else 1
  if ntasks <= 1:
    return None  # an allocation of one task: one process, nothing to coordinate
  missing = [v for v in _SLURM_NEEDS if v not in env]
  if missing:
    raise ClusterError(
        f"SLURM job {env['SLURM_JOB_ID']} has SLURM_NTASKS={ntasks} but {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not set: this process is not one task of a job "
        "step. Start one process per task with `srun python launch/run.py ...` (see "
        "launch/slurm.sbatch), not directly from the batch script.")
  proc_id = _int(env, "SLURM_PROCID", "SLURM")
  if not 0 <= proc_id < ntasks:
    raise ClusterError(f"SLURM: SLURM_PROCID={proc_id} is not below SLURM_NTASKS={ntasks}.")
  job = _int(env, "SLURM_JOB_ID", "SLURM")
  port = port or str(job % 2**12 + 65535 - 2**12 + 1)  # jax's pick in the ephemeral range
  nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM") if "SLURM_STEP_NUM_NODES" in env else None
  return Cluster("slurm", ntasks, proc_id, f"{_first_host(env['SLURM_STEP_NODELIST'])}:{port}",
                 f"SLURM_JOB_ID={job}, SLURM_NTASKS={ntasks}, SLURM_PROCID={proc_id}",
                 all_local_devices=nodes == ntasks)


def _first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: node001, node001,b, node[001-015],b or node[001,007]."""
  cut = next((i for i, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
  if cut == len(nodelist) or nodelist[cut] == ",":
    return nodelist[:cut]
  rest = nodelist[cut + 1:]
  return nodelist[:cut] + rest[:next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))]


def _gke_tpu(env, port) -> Optional[Cluster]:
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if not hosts:
    return None
  hosts = hosts.split(",")
  slices = int(env.get("MEGASCALE_NUM_SLICES") or 1)
  slice_id = int(env.get("MEGASCALE_SLICE_ID") or 0)
  worker = _int(env, "TPU_WORKER_ID", "GKE TPU")
  coordinator = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or hosts[0]).split(":")[0]
  return Cluster("gke_tpu", len(hosts) * slices, worker + slice_id * len(hosts),
                 f"{coordinator}:{port or _TPU_PORT}",
                 f"TPU_WORKER_ID={worker}, {len(hosts)} workers x {slices} slice(s)")


def _tpu_vm(env, sysfs) -> Optional[Cluster]:
  """A Cloud TPU VM: TPU chips on the PCI bus; jax reads the workers from the metadata server."""
  if "TPU_SKIP_MDS_QUERY" in env:
    return None
  chips = 0
  for vendor in glob.glob(os.path.join(sysfs, "bus", "pci", "devices", "*", "vendor")):
    device = os.path.join(os.path.dirname(vendor), "device")
    if _read(vendor) == _GOOGLE_PCI_VENDOR and _read(device) in _TPU_PCI_DEVICES:
      chips += 1
  if not chips:
    return None
  return Cluster("tpu_vm", None, None, None, f"{chips} TPU chips; workers from the metadata server")


def _read(path) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _kubernetes(env, port) -> Optional[Cluster]:
  if "KUBERNETES_SERVICE_HOST" not in env or "JOB_COMPLETION_INDEX" not in env:
    return None  # a pod that is no indexed Job's: one process
  index = _int(env, "JOB_COMPLETION_INDEX", "Kubernetes")
  job = f"JobSet {env['JOBSET_NAME']}" if env.get("JOBSET_NAME") else "indexed Job"
  return Cluster("kubernetes", None, index, None,
                 f"{job}, JOB_COMPLETION_INDEX={index}; process count from the Job's parallelism")


def initialize(cluster: Cluster, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300) -> bool:
  """Starts jax.distributed for a multi-process `cluster`; False (nothing to do) for one process.

  A peer that stops sending heartbeats for `heartbeat_timeout_s` seconds ends every other process
  with an error naming it, instead of leaving them blocked in a collective.
  """
  import jax
  if not cluster.multi_process:
    return False
  if cluster.kind == "kubernetes":
    try:
      import kubernetes  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise ClusterError(
          f"Kubernetes {cluster.source}: jax reads the process count and the coordinator through "
          "the Kubernetes API, which needs the `kubernetes` package (pip install 'jax[k8s]') and a "
          "service account that may read pods and jobs (launch/k8s/rbac.yaml).") from None
  kwargs = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                initialization_timeout=int(initialization_timeout_s))
  if cluster.kind == "flags" or cluster.all_local_devices:
    # jax's own SLURM detection gives each task one GPU (local id), wrong for one task per node.
    kwargs.update(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                  process_id=cluster.process_id, cluster_detection_method="deactivate")
  host, _, port = (cluster.coordinator or "").rpartition(":")
  if host.strip("[]") in _LOOPBACK:
    # Bind the coordinator to loopback only (jax's default is every interface) on one machine.
    kwargs["coordinator_bind_address"] = f"127.0.0.1:{port}"
    if cluster.kind == "flags":
      kwargs["coordinator_address"] = f"127.0.0.1:{port}"
  # CPU collectives across processes need gloo; the option only touches the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  log.info("Process %d of %d, %d local / %d global devices.", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def report(cluster: Cluster, mesh=None) -> str:
  """One line of facts a run starts with: cluster, process, devices and the mesh."""
  import jax
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  text = (f"Cluster {cluster.describe()}: process {jax.process_index()} of {jax.process_count()}, "
          f"{len(local)} local / {jax.device_count()} global devices ({', '.join(kinds)})")
  if mesh is not None:
    text += ", mesh " + " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return text + "."
