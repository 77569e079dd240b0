"""The kernel stage: the CO-RE eBPF object (bpf/), its loader over the system's libbpf, and the
monitor process that drains it.

libbpf calls libbpf.so.1 through ctypes; monitor loads the object and turns what the kernel
counts into typed records (records); pins opens what each exec ran the moment its record arrives;
worker is the process that runs the monitor and sends its records, and the pinned files, to the
identity worker.
"""
