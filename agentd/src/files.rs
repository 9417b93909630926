//! Private files and directories: created 0600 / 0700, replaced atomically
//! and durably, so that a crash (SIGKILL, power loss) at any instant leaves
//! either the old or the new content, never a mix and never an empty file.
//!
//! ```text
//! write_private(path):  .name.tmp-<pid>-<n> (O_EXCL, 0600) ─ write ─ fsync
//!                       ─ rename over path ─ fsync(dir)
//! ```
//!
//! A crash before the rename leaves a temporary file behind;
//! [`remove_stale_temporaries`] deletes those at the next start (they may
//! hold key material).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What every temporary file name contains (after a leading dot).
const TMP_MARK: &str = ".tmp-";

/// Create `dir` (and parents) if missing and make it 0700. A directory this
/// creates is made durable in its parent.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    let existed = dir.is_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if !existed {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Flush a directory's entries (created, renamed or removed files) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replace `path` with `data` atomically: write a new 0600 temporary file in
/// the same directory (created exclusively, so never one left over from
/// before), sync it, rename it over `path`, sync the directory.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}{TMP_MARK}{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Rename `from` over `to` and make the rename durable.
pub fn rename_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(parent_of(to))?;
    let from_dir = parent_of(from);
    if from_dir != parent_of(to) {
        sync_dir(from_dir)?;
    }
    Ok(())
}

/// Remove `path` (missing is fine) and make the removal durable.
pub fn remove_durable(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Delete temporary files that [`write_private`] left in `dir` when the
/// process died before renaming them. Only call this while no other process
/// writes in `dir` (agentd holds its database lock by then).
pub fn remove_stale_temporaries(dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".tmp") && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Read a file, `None` if it does not exist.
pub fn read_optional(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_file_and_dir_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let f = dir.join("secret");
        write_private(&f, b"one").unwrap();
        write_private(&f, b"two").unwrap();
        assert_eq!(read_optional(&f).unwrap().unwrap(), b"two");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(read_optional(&dir.join("none")).unwrap().is_none());
        // Nothing but the file itself is left in the directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn a_leftover_temporary_is_neither_reused_nor_loosens_the_mode() {
        // A temporary left by a killed process with the same name pattern
        // and loose permissions is neither reused nor left behind.
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("identity.key");
        let stale = tmp
            .path()
            .join(format!(".identity.key{TMP_MARK}{}-0", std::process::id()));
        std::fs::write(&stale, b"old secret").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"new").unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = tmp.path().join(format!(".identity.key{TMP_MARK}999-3"));
        std::fs::write(&stale, b"key material").unwrap();
        std::fs::write(tmp.path().join("identity.key"), b"keep").unwrap();
        std::fs::write(tmp.path().join(".hidden"), b"keep").unwrap();
        assert_eq!(remove_stale_temporaries(tmp.path()).unwrap(), 1);
        assert!(!stale.exists());
        assert!(tmp.path().join("identity.key").exists());
        assert!(tmp.path().join(".hidden").exists());
        assert_eq!(remove_stale_temporaries(&tmp.path().join("no")).unwrap(), 0);
    }

    #[test]
    fn durable_rename_and_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        write_private(&a, b"x").unwrap();
        rename_durable(&a, &b).unwrap();
        assert!(!a.exists());
        remove_durable(&b).unwrap();
        remove_durable(&b).unwrap();
        assert!(!b.exists());
    }
}
