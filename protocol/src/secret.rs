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

/// Written in a config file, stands for the directory systemd hands a
/// service its `LoadCredential=` files in (the `CREDENTIALS_DIRECTORY`
/// environment variable), e.g.
/// `token-file = "${CREDENTIALS_DIRECTORY}/millrace_uplink-token"`.
pub const CREDENTIALS_DIRECTORY: &str = "${CREDENTIALS_DIRECTORY}";

/// Replaces [`CREDENTIALS_DIRECTORY`] in config `text` with `dir` (the
/// value of `$CREDENTIALS_DIRECTORY`). Comment lines are left alone. Used
/// while `dir` is `None` (not started by systemd with credentials), or with
/// a `dir` that cannot sit inside a TOML string, it is an error that says so.
pub fn expand_credentials_directory<'a>(
    text: &'a str,
    dir: Option<&str>,
) -> Result<std::borrow::Cow<'a, str>, String> {
    let used =
        |line: &str| !line.trim_start().starts_with('#') && line.contains(CREDENTIALS_DIRECTORY);
    let Some(first) = text.lines().position(used) else {
        return Ok(std::borrow::Cow::Borrowed(text));
    };
    let dir = match dir {
        None => {
            return Err(format!(
                "line {}: {CREDENTIALS_DIRECTORY} is used but CREDENTIALS_DIRECTORY is not set: \
                 start the service with systemd's LoadCredential= (see the unit file), or set it",
                first + 1
            ))
        }
        Some(d)
            if d.is_empty()
                || d.chars()
                    .any(|c| c.is_control() || matches!(c, '"' | '\'' | '\\')) =>
        {
            return Err(format!(
                "CREDENTIALS_DIRECTORY ({d:?}) cannot be used in a config path"
            ))
        }
        Some(d) => d.trim_end_matches('/'),
    };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if used(line) {
            out.push_str(&line.replace(CREDENTIALS_DIRECTORY, dir));
        } else {
            out.push_str(line);
        }
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// The environment variable `PREFIX_NAME` that carries the secret of `name`
/// (an agent id, a server name): `name` upper-cased, every character other
/// than an ASCII letter or digit as `_`.
pub fn env_var_name(prefix: &str, name: &str) -> String {
    let suffix: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}_{suffix}")
}

/// Whether `token` is the placeholder of the shipped examples.
pub fn is_placeholder(token: &str) -> bool {
    token.to_ascii_lowercase().contains("change-me")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credentials_directory_is_expanded_outside_comments_only() {
        let text = "# token-file = \"${CREDENTIALS_DIRECTORY}/x\"\ntoken-file = \"${CREDENTIALS_DIRECTORY}/millrace_uplink-token\"\n";
        let out =
            expand_credentials_directory(text, Some("/run/credentials/millrace-agent.service/"))
                .unwrap();
        assert_eq!(
            out,
            "# token-file = \"${CREDENTIALS_DIRECTORY}/x\"\ntoken-file = \"/run/credentials/millrace-agent.service/millrace_uplink-token\"\n"
        );
        let unset = expand_credentials_directory(text, None).unwrap_err();
        assert!(
            unset.contains("line 2") && unset.contains("LoadCredential="),
            "{unset}"
        );
        assert!(expand_credentials_directory(text, Some("/tmp/a\"b")).is_err());
        let only_comment = "# ${CREDENTIALS_DIRECTORY}\nx = 1\n";
        assert!(matches!(
            expand_credentials_directory(only_comment, None),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
    }

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
