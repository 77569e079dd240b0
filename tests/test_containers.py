"""Container ids and systemd units from /proc/PID/cgroup, one literal file per runtime."""

import os
import subprocess

from picosnitch.identity.containers import container_of, container_of_pid

ID = "3f4e8a9b2c1d" + "0" * 52  # container ids are 64 hex digits; the label keeps 12


def v2(path: str) -> str:
    return f"0::{path}\n"


def test_docker_with_systemd_driver():
    assert container_of(v2(f"/system.slice/docker-{ID}.scope")) == "docker:3f4e8a9b2c1d"


def test_docker_with_cgroupfs_driver_on_cgroup_v1():
    text = "".join(f"{n}:{c}:/docker/{ID}\n" for n, c in
                   [(12, "pids"), (11, "memory"), (2, "cpu,cpuacct"), (1, "name=systemd")])
    assert container_of(text) == "docker:3f4e8a9b2c1d"


def test_podman_rootful_and_rootless():
    assert container_of(v2(f"/machine.slice/libpod-{ID}.scope/container")) == "podman:3f4e8a9b2c1d"
    rootless = f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
    assert container_of(v2(rootless)) == "podman:3f4e8a9b2c1d"


def test_podman_conmon_runs_on_the_host():
    assert container_of(v2(f"/machine.slice/libpod-conmon-{ID}.scope")) == \
        f"unit:libpod-conmon-{ID}.scope"


def test_kubernetes_with_containerd_and_systemd_driver():
    path = ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice/"
            f"cri-containerd-{ID}.scope")
    assert container_of(v2(path)) == "containerd:3f4e8a9b2c1d"


def test_kubernetes_with_cri_o():
    path = f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podab_cd.slice/crio-{ID}.scope"
    assert container_of(v2(path)) == "crio:3f4e8a9b2c1d"


def test_kubernetes_with_cgroupfs_driver():
    path = f"/kubepods/besteffort/pod5d7c4b3a-1111-2222-3333-444455556666/{ID}"
    assert container_of(f"4:memory:{path}\n1:name=systemd:{path}\n") == "k8s:3f4e8a9b2c1d"


def test_systemd_nspawn_with_escaped_name():
    path = r"/machine.slice/machine-build\x2dbox.scope/payload/system.slice/ssh.service"
    assert container_of(v2(path)) == "nspawn:build-box"


def test_lxc_legacy_and_lxc_4():
    assert container_of("3:memory:/lxc/web01\n1:name=systemd:/lxc/web01/init.scope\n") == "lxc:web01"
    assert container_of(v2("/lxc.payload.web01/system.slice/nginx.service")) == "lxc:web01"
    assert container_of(v2("/lxc.monitor.web01")) == ""


def test_nested_containers_are_named_by_the_outermost():
    other = "9" * 64
    assert container_of(v2(f"/docker/{ID}/docker/{other}")) == "docker:3f4e8a9b2c1d"


def test_system_service():
    assert container_of(v2("/system.slice/ssh.service")) == "unit:ssh.service"


def test_user_units_are_named_by_the_innermost_unit():
    path = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1234.scope"
    assert container_of(v2(path)) == "unit:app-firefox-1234.scope"
    assert container_of(v2("/user.slice/user-1000.slice/session-3.scope")) == "unit:session-3.scope"


def test_hybrid_hierarchy_uses_the_systemd_path():
    text = ("12:cpu,cpuacct:/\n"
            "1:name=systemd:/system.slice/cron.service\n"
            "0::/system.slice/cron.service\n")
    assert container_of(text) == "unit:cron.service"


def test_v1_with_only_the_named_systemd_hierarchy_set():
    assert container_of("4:memory:/\n1:name=systemd:/system.slice/nginx.service\n") == \
        "unit:nginx.service"


def test_nothing_to_report():
    assert container_of(v2("/")) == ""
    assert container_of("") == ""
    assert container_of(v2("/docker/not-an-id")) == ""


def test_a_running_process_and_an_exited_one():
    with open("/proc/self/cgroup") as f:
        assert container_of_pid(os.getpid()) == container_of(f.read())
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert container_of_pid(proc.pid) == ""
