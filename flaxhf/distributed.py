"""Starting the multi-process JAX runtime before anything else touches devices."""

import logging
import os
from typing import Optional

import jax

log = logging.getLogger("flaxhf")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids=None):
  """Initialises jax.distributed from explicit flags, or auto-detects TPU VM pods and SLURM.

  A single process with no flags and no cluster environment is left alone.
  """
  explicit = coordinator_address is not None
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    host = coordinator_address.rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
      # Bind the coordinator to loopback only (never every interface) for local multi-process runs.
      kwargs["coordinator_bind_address"] = coordinator_address.replace("localhost", "127.0.0.1")
    # CPU collectives across processes need gloo; the option only touches the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
  elif _on_cluster():
    jax.distributed.initialize()
  else:
    return False
  log.info("Process %d of %d, %d local / %d global devices.", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _on_cluster() -> bool:
  """A TPU VM pod slice or a multi-task SLURM job, where jax.distributed finds its own peers."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
  return bool(tpu_hosts and "," in tpu_hosts)
