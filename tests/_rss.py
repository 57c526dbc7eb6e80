"""Peak RSS of this process for the fuzz workers (run as scripts from tests/)."""
import resource


def vm_hwm_mib() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries the
    forking parent's high-water mark into ru_maxrss across exec, so a child started from a
    big test process would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
