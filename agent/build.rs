//! Link settings of the agent's binary.
//!
//! Built natively on Linux with glibc 2.36 or later, the binary packs its
//! relative relocations (`-z pack-relative-relocs`, `DT_RELR`): a table of a
//! few kilobytes instead of `.rela.dyn` (≈ 800 KiB for the x86-64 build),
//! which the loader reads whole at start and which then stays resident for
//! the life of the process, so the agent's peak RSS is ≈ 0.6 MiB lower. The
//! binary stays position-independent (the loader still places it at a
//! random address). Such a binary needs glibc 2.36 or later where it runs;
//! `MILLRACE_NO_RELR=1` at build time leaves the relocations as they were,
//! for a host with an older glibc. Cross builds (the gateway's aarch64
//! build, whose sysroot is older) are left alone.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MILLRACE_NO_RELR");
    if std::env::var_os("MILLRACE_NO_RELR").is_some() {
        return;
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    if target != host || !target.ends_with("-linux-gnu") {
        return;
    }
    if glibc_version().is_some_and(|v| v >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The host's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn glibc_version() -> Option<(u32, u32)> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
