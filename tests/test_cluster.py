"""Cluster detection (SLURM, Open MPI, Kubernetes, TPU) against jax's own, --dry_run, launch files."""

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

import cluster_utils
from flaxhf import distributed
from flaxhf.distributed import ClusterError
from test_launch import (ROOT, STEPS, exported, hostname_is_loopback, run_cmd, tiny_run_env,
                         train_curve)

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "gpu[007-008],login1", "SLURM_STEP_NUM_NODES": "2"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
# Every value jax would otherwise ask the GCE metadata server for (nothing here may reach it).
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "localhost,tpu-1,tpu-2,tpu-3", "TPU_WORKER_ID": "2",
           "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
           "MEGASCALE_COORDINATOR_ADDRESS": "localhost:8080", "TPU_SKIP_MDS_QUERY": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
  yield cluster_utils.tiny_setup(tmp_path_factory, minilm_path)
  cluster_utils.close()


def jax_detects(monkeypatch, env, tpu_vm=False):
  """What jax.distributed.initialize() would pick in `env`, from jax's private cluster classes."""
  from jax._src import clusters
  from jax._src.clusters import cloud_tpu_cluster, cluster
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORD", "KUBERNETES_")):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", tpu_vm)
  monkeypatch.setattr(cluster, "running_in_cloud_tpu_vm", tpu_vm)
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 5)


@pytest.mark.parametrize("name,env", [("slurm", SLURM), ("ompi", OMPI), ("gke_tpu", GKE_TPU),
                                      ("slurm", dict(SLURM, JAX_COORDINATOR_PORT="1234"))])
def test_detection_agrees_with_jax(monkeypatch, name, env):
  got = distributed.detect(environ=env)
  coordinator, n, i, _ = jax_detects(monkeypatch, env, tpu_vm=name == "gke_tpu")
  assert (got.kind, got.coordinator, got.num_processes, got.process_id) == (name, coordinator, n, i)
  assert got.multi_process


def test_detected_values():
  slurm = distributed.detect(environ=SLURM)
  assert (slurm.coordinator, slurm.num_processes, slurm.process_id) == ("gpu007:61586", 4, 3)
  assert not slurm.all_local_devices  # 4 tasks on 2 nodes: one per GPU, as jax assumes
  per_node = distributed.detect(environ=dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="1"))
  assert per_node.all_local_devices  # 2 tasks on 2 nodes: each takes all of its node's GPUs
  tpu = distributed.detect(environ=GKE_TPU)
  assert (tpu.coordinator, tpu.num_processes, tpu.process_id) == ("localhost:8482", 8, 6)
  ompi = distributed.detect(environ=OMPI)
  assert (ompi.coordinator, ompi.num_processes, ompi.process_id) == ("10.96.0.1:62624", 4, 2)
  flags = distributed.detect("10.0.0.1:1234", 2, 1, environ=SLURM)  # flags win
  assert (flags.kind, flags.coordinator, flags.process_id) == ("flags", "10.0.0.1:1234", 1)
  for env in ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, {"KUBERNETES_SERVICE_HOST": "x"}):
    assert distributed.detect(environ=env).kind == "none"  # one process: nothing to start


@pytest.mark.parametrize("nodelist,host", [("node001", "node001"), ("node001,b", "node001"),
                                           ("node[001-015],b", "node001"),
                                           ("node[003,007-015]", "node003")])
def test_slurm_first_host_matches_jax(monkeypatch, nodelist, host):
  env = dict(SLURM, SLURM_STEP_NODELIST=nodelist)
  assert distributed.detect(environ=env).coordinator == f"{host}:61586"
  assert jax_detects(monkeypatch, env)[0] == f"{host}:61586"


def test_kubernetes_indexed_job_and_jobset():
  job = distributed.detect(environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                                    "JOB_COMPLETION_INDEX": "3"})
  assert (job.kind, job.process_id, job.num_processes) == ("kubernetes", 3, None)
  assert job.multi_process and "indexed Job" in job.source
  jobset = distributed.detect(environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                                       "JOB_COMPLETION_INDEX": "0", "JOBSET_NAME": "bert"})
  assert "JobSet bert" in jobset.source
  # jax reads the process count through the Kubernetes API: without its client, say so first.
  try:
    import kubernetes  # noqa: F401  pylint: disable=unused-import
    pytest.skip("the kubernetes package is installed; this checks the error without it")
  except ImportError:
    pass
  with pytest.raises(ClusterError, match=r"pip install 'jax\[k8s\]'.*launch/k8s/rbac.yaml"):
    distributed.initialize(job)


def test_gke_tpu_single_host_and_tpu_vm(tmp_path):
  single = distributed.detect(environ={"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"})
  assert single.kind == "gke_tpu" and not single.multi_process
  # A Cloud TPU VM: TPU chips on the PCI bus (a gVNIC shares Google's vendor id; it is no TPU).
  for i, device in enumerate(["0x0063"] * 4 + ["0x0042"]):
    folder = tmp_path / "bus" / "pci" / "devices" / f"0000:00:0{i}.0"
    folder.mkdir(parents=True)
    (folder / "vendor").write_text("0x1ae0\n")
    (folder / "device").write_text(device + "\n")
  vm = distributed.detect(environ={}, sysfs=str(tmp_path))
  assert vm.kind == "tpu_vm" and vm.source.startswith("4 TPU chips") and vm.multi_process
  assert vm.num_processes is None  # jax asks the metadata server
  assert distributed.detect(environ={"TPU_SKIP_MDS_QUERY": "1"}, sysfs=str(tmp_path)).kind == "none"


@pytest.mark.parametrize("env,message", [
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"},
     "SLURM_NTASKS=2 but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set"),
    (dict(SLURM, SLURM_PROCID=None), "SLURM_PROCID is not set: this process is not one task"),
    (dict(SLURM, SLURM_STEP_NODELIST=None), "SLURM_STEP_NODELIST is not set"),
    (dict(SLURM, SLURM_PROCID="4"), "SLURM_PROCID=4 is not below SLURM_NTASKS=4"),
    (dict(SLURM, SLURM_NTASKS="four"), "SLURM_NTASKS='four' is not an integer"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_MCA_orte_hnp_uri is not set"),
    (dict(GKE_TPU, TPU_WORKER_ID=None), "TPU_WORKER_ID is not set"),
])
def test_partial_environment_fails_naming_the_variable(env, message):
  env = {k: v for k, v in env.items() if v is not None}
  with pytest.raises(ClusterError, match=re.escape(message)):
    distributed.detect(environ=env)


def test_partial_flags_fail():
  with pytest.raises(ClusterError, match="go together"):
    distributed.detect("127.0.0.1:1234", None, None, environ={})
  with pytest.raises(ClusterError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.detect("127.0.0.1:1234", 2, 2, environ={})


def test_initialize_arguments(monkeypatch):
  """What reaches jax.distributed.initialize: jax's detection, unless it would be wrong."""
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  previous = jax.config.jax_cpu_collectives_implementation
  try:
    assert not distributed.initialize(distributed.detect(environ={}))
    distributed.initialize(distributed.detect(environ=dict(SLURM, SLURM_STEP_NODELIST="127.0.0.1")),
                           heartbeat_timeout_s=7)
    distributed.initialize(distributed.detect(environ=dict(SLURM, SLURM_NTASKS="2",
                                                           SLURM_PROCID="1")))
    distributed.initialize(distributed.detect("localhost:999", 2, 0, environ={}))
  finally:
    jax.config.update("jax_cpu_collectives_implementation", previous)
  slurm, per_node, flags = calls
  # jax detects SLURM itself; flaxhf only keeps a loopback coordinator off other interfaces.
  assert slurm == dict(heartbeat_timeout_seconds=7, initialization_timeout=300,
                       coordinator_bind_address="127.0.0.1:61586")
  # One task per node: jax's detection would give each process a single GPU.
  assert per_node == dict(heartbeat_timeout_seconds=100, initialization_timeout=300,
                          coordinator_address="gpu007:61586", num_processes=2, process_id=1,
                          cluster_detection_method="deactivate")
  assert flags["coordinator_address"] == flags["coordinator_bind_address"] == "127.0.0.1:999"


def test_dry_run_prints_cluster_devices_and_mesh(tiny, tmp_path):
  workdir = tmp_path / "dry"
  proc = subprocess.run(run_cmd(tiny, workdir, "--dry_run"), cwd=ROOT, env=tiny_run_env(8),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[0] == (
      "Cluster none (no cluster environment): process 0 of 1, 8 local / 8 global devices (cpu), "
      "mesh data=2 x fsdp=4 x tensor=1.")
  assert "gives each of the 1 processes 8 rows a step; mesh.rules=fsdp" in proc.stdout
  assert not workdir.exists()  # no data, model or workdir


def test_partial_slurm_environment_fails_fast(tiny, tmp_path):
  env = dict(tiny_run_env(1), SLURM_JOB_ID="77", SLURM_NTASKS="2")
  start = time.monotonic()
  proc = subprocess.run(run_cmd(tiny, tmp_path / "w", "--dry_run"), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 78, proc.stderr[-3000:]
  assert "SLURM_NTASKS=2 but SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID are not set" in (
      proc.stderr)
  assert "srun python launch/run.py" in proc.stderr and "Traceback" not in proc.stderr
  assert time.monotonic() - start < 60  # no wait for peers (jax's would be 300 s)


def test_slurm_two_processes_equal_one_process(tiny):
  if not hostname_is_loopback():
    pytest.skip("this host name resolves to a non-loopback address, where gloo would listen")
  cluster_utils.start_uninterrupted(tiny, 1)  # both runs at once: they overlap on 2 cores
  workdir, outputs = cluster_utils.uninterrupted(tiny, 2)
  ref, _ = cluster_utils.uninterrupted(tiny, 1)
  for i, (_, err) in enumerate(outputs):
    # The facts every run starts with, as the dry run prints them; no flags were passed.
    assert (f"Cluster slurm (SLURM_JOB_ID=4242, SLURM_NTASKS=2, SLURM_PROCID={i}), coordinator "
            f"127.0.0.1:") in err
    assert (f"process {i} of 2, 4 local / 8 global devices (cpu), mesh data=2 x fsdp=4 x "
            "tensor=1.") in err
    assert f"Process {i} of 2 feeds 4 of the 8 rows of each global batch." in err
  got, want = train_curve(workdir), train_curve(ref)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-4)
  assert np.ptp([loss for loss, _ in want.values()]) > 1e-2
  assert json.load(open(workdir / "eval_results.json")) == json.load(open(ref / "eval_results.json"))
  weights, ref_weights = exported(workdir), exported(ref)
  assert sorted(weights) == sorted(ref_weights)
  for name in weights:
    np.testing.assert_allclose(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)


# ---- launch files: syntax, and the launch/run.py command each one runs ------------------------
def _run_commands(text):
  """The `launch/run.py` command lines in a script or manifest (continuation lines joined)."""
  text = text.replace("\\\n", " ")
  return [line.strip() for line in text.splitlines()
          if "launch/run.py" in line and not line.strip().startswith("#")]


@pytest.mark.parametrize("script", ["launch/tpu_pod.sh", "launch/slurm.sbatch"])
def test_launch_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


def test_launch_files_run_the_documented_command():
  import yaml
  readme = open(os.path.join(ROOT, "README.md")).read()
  read = lambda name: open(os.path.join(ROOT, name)).read()  # noqa: E731
  # The scripts hand their arguments to launch/run.py unchanged, and add no cluster flags.
  for name, launcher in (("launch/tpu_pod.sh", "bash launch/tpu_pod.sh"),
                         ("launch/slurm.sbatch", "sbatch launch/slurm.sbatch")):
    [command] = _run_commands(read(name))
    assert re.search(r'\.venv/bin/python launch/run\.py ("\$@"|\$args)', command), (name, command)
    assert "--coordinator_address" not in command and "--process_id" not in command, name
    # The README shows the launcher with the same --config/--workdir arguments as run.py takes.
    assert re.search(re.escape(launcher) + r" .*--config configs/\S+ --workdir \S+", readme), name
  for name in ("launch/k8s/jobset_gpu.yaml", "launch/k8s/jobset_tpu.yaml", "launch/k8s/rbac.yaml"):
    docs = [d for d in yaml.safe_load_all(read(name)) if d]
    assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), name
    assert f"kubectl apply -f {name}" in readme or f"-f {name}" in readme, name
    if "jobset" not in name:
      continue
    [jobset] = [d for d in docs if d["kind"] == "JobSet"]
    [replicated] = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    # An indexed Job: JOB_COMPLETION_INDEX is the process id, parallelism the process count.
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"], name
    [container] = job["template"]["spec"]["containers"]
    script = " ".join(container["command"] + container.get("args", []))
    assert container["command"][:2] == ["bash", "-c"], name
    assert re.fullmatch(r"bash -c \.venv/bin/python launch/run\.py --config configs/\S+ "
                        r"--workdir \S+", script), (name, script)
    # Time between SIGTERM and SIGKILL, for the preemption checkpoint.
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] >= 60, name
