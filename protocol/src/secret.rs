//! Secrets kept in files (`token-file = …`, systemd `LoadCredential=`).

use std::path::Path;

/// What reading a secret file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// The first line, without surrounding whitespace.
    pub value: String,
    /// Set when the file can be read by its group or by others: the caller
    /// warns about it at start.
    pub loose_permissions: Option<String>,
}

/// Reads the secret held by the file at `path`. An empty file is an error.
pub fn read_secret_file(path: &Path) -> Result<SecretFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value = text.lines().next().unwrap_or("").trim().to_owned();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(SecretFile {
        value,
        loose_permissions: loose_permissions(path),
    })
}

#[cfg(unix)]
fn loose_permissions(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} is readable by its group or others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(not(unix))]
fn loose_permissions(_: &Path) -> Option<String> {
    None
}

/// Whether `token` is the placeholder of the shipped examples.
pub fn is_placeholder(token: &str) -> bool {
    token.to_ascii_lowercase().contains("change-me")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_line_and_flags_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret-token-value \nignored\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(read_secret_file(&path).unwrap().loose_permissions, None);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let loose = read_secret_file(&path).unwrap().loose_permissions.unwrap();
            assert!(loose.contains("chmod 600"), "{loose}");
        }
        assert_eq!(read_secret_file(&path).unwrap().value, "s3cret-token-value");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_secret_file(&path).unwrap_err().contains("empty"));
        assert!(read_secret_file(&dir.path().join("nope")).is_err());
        assert!(is_placeholder("demo-token-CHANGE-ME-0123"));
    }
}
