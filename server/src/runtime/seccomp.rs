//! The seccomp profile of every container: the system calls an agent is refused.
//!
//! A coding agent runs shells, compilers, interpreters, package managers and network clients.
//! None of them needs to reconfigure the kernel, make namespaces, mount, trace other
//! processes, or reach the kernel's rarely used and often vulnerable surfaces. The profile is
//! a deny-list (the default action allows): the reference is the default profile of container
//! engines (Docker, Podman), whose allow-list also refuses exactly these calls to a container
//! without capabilities. A deny-list does not break programs on the calls nobody thought of,
//! and moorline's containers already have no capabilities, so most of these calls would fail
//! anyway: the profile takes away the kernel code behind them (and, for user namespaces, the
//! way to get capabilities back).
//!
//! Refused calls fail with `EPERM`, except `clone3` and the `io_uring` calls, which fail with
//! `ENOSYS` so that libc and libuv fall back to `clone` and to their thread pool. The filter
//! covers the 32-bit ABIs of the machine too, so they are no way around it. Keep
//! docs/RUNTIME.md ("Container boundary") in step with this list.

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// Refused outright, with `EPERM`.
pub(crate) const DENIED: &[&str] = &[
    // Namespaces: a new user namespace gives back every capability inside it, and with it the
    // kernel code of mount, netfilter, ... (`unshare`/`clone` are refused only with
    // CLONE_NEWUSER, below).
    "setns",
    // Mounting and changing roots.
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    // The kernel keyring (not namespaced).
    "keyctl",
    "add_key",
    "request_key",
    // eBPF, performance counters, userfaultfd: large kernel surfaces, and tools of exploits.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    // Other processes' memory.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    "kcmp",
    // Kernel modules and replacing the kernel.
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    // The machine's clock.
    "clock_settime",
    "clock_settime64",
    "settimeofday",
    "stime",
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    // Swap, quotas, accounting, the kernel log, I/O ports, old and obscure interfaces.
    "swapon",
    "swapoff",
    "quotactl",
    "quotactl_fd",
    "acct",
    "syslog",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vhangup",
    "vm86",
    "vm86old",
    // File handles bypass path permissions (the "shocker" escape).
    "open_by_handle_at",
    "name_to_handle_at",
    // fanotify watches whole filesystems.
    "fanotify_init",
];

/// Refused with `ENOSYS`, so callers fall back to an older call.
pub(crate) const UNAVAILABLE: &[&str] = &[
    // Its flags are in memory, where seccomp cannot see them (CLONE_NEWUSER): glibc falls back
    // to `clone`, whose flags are checked.
    "clone3",
    // io_uring performs system calls the filter never sees, and has been a steady source of
    // kernel bugs; libuv and others fall back to their thread pool.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// `CLONE_NEWUSER`, refused in `clone` and `unshare` flags.
const CLONE_NEWUSER: u64 = 0x1000_0000;

/// `personality(2)` flags that weaken the process's own memory protections (no address
/// randomisation, executable data, a mapping at address 0). Each is refused alone; asking
/// for the current personality (`0xffffffff`) is refused with them, which no agent needs.
const UNSAFE_PERSONALITY: &[u64] = &[
    0x0004_0000, // ADDR_NO_RANDOMIZE
    0x0010_0000, // MMAP_PAGE_ZERO
    0x0020_0000, // ADDR_COMPAT_LAYOUT
    0x0040_0000, // READ_IMPLIES_EXEC
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

fn rule(
    names: &[&str],
    errno: u32,
    args: Vec<LinuxSeccompArg>,
) -> Result<LinuxSyscall, OciSpecError> {
    let mut b = LinuxSyscallBuilder::default()
        .names(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(errno);
    if !args.is_empty() {
        b = b.args(args);
    }
    b.build()
}

fn masked(index: usize, mask: u64) -> Result<LinuxSeccompArg, OciSpecError> {
    LinuxSeccompArgBuilder::default()
        .index(index)
        .value(mask)
        .value_two(mask)
        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
        .build()
}

/// The architectures the filter is written for: this machine's, and the 32-bit ABIs its
/// kernel also runs (whose system call numbers differ).
fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchNative]
    }
}

/// The profile, as the OCI spec carries it.
pub(crate) fn profile() -> Result<LinuxSeccomp, OciSpecError> {
    // The flags are clone's first argument on x86 and arm (s390 swaps the first two).
    let flags_arg = if cfg!(target_arch = "s390x") { 1 } else { 0 };
    let mut syscalls = vec![
        rule(DENIED, EPERM, Vec::new())?,
        rule(UNAVAILABLE, ENOSYS, Vec::new())?,
        rule(&["unshare"], EPERM, vec![masked(0, CLONE_NEWUSER)?])?,
        rule(&["clone"], EPERM, vec![masked(flags_arg, CLONE_NEWUSER)?])?,
    ];
    for flag in UNSAFE_PERSONALITY {
        syscalls.push(rule(&["personality"], EPERM, vec![masked(0, *flag)?])?);
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(architectures())
        .syscalls(syscalls)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_refuses_user_namespaces_and_allows_the_rest() {
        let json = serde_json::to_value(profile().expect("profile")).expect("json");
        assert_eq!(json["defaultAction"], "SCMP_ACT_ALLOW");
        let rules = json["syscalls"].as_array().expect("rules");
        let names = |r: &serde_json::Value| r["names"].clone();
        assert!(
            rules
                .iter()
                .any(|r| names(r) == serde_json::json!(["unshare"])
                    && r["args"][0]["value"] == CLONE_NEWUSER
                    && r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ")
        );
        assert!(
            rules[0]["names"]
                .as_array()
                .expect("names")
                .contains(&"mount".into())
        );
        assert_eq!(rules[0]["errnoRet"], EPERM);
        assert_eq!(rules[1]["errnoRet"], ENOSYS);
    }
}
