//! `run`'s TLS and auth flags onto the client builder: files read here, with
//! errors naming the flag and the path (exit code 2), and the token never in
//! a message.

use std::path::Path;

use quorum_quest_client::ClientBuilder;

use crate::args::RunArgs;

/// Applies `--ca-cert`, `--client-cert`/`--client-key`, `--tls-domain`,
/// `--header`, `--token-file`/`--token-env` to `builder`. `Err` is a message
/// for a usage error (unreadable file, empty token...); the library checks
/// the contents (PEM, header syntax) in `build()`.
pub fn apply(mut builder: ClientBuilder, args: &RunArgs) -> Result<ClientBuilder, String> {
    builder = tls(builder, args)?;
    let token = token(args)?;
    for (key, value) in &args.headers {
        if token.is_some() && key.eq_ignore_ascii_case("authorization") {
            return Err(format!(
                "--header {key}=... and --token-{} both set the authorization header; keep one",
                if args.token_file.is_some() {
                    "file"
                } else {
                    "env"
                }
            ));
        }
        builder = builder.metadata(key, value);
    }
    if let Some(token) = token {
        builder = builder.bearer_token(token);
    }
    Ok(builder)
}

#[cfg(feature = "tls")]
fn tls(mut builder: ClientBuilder, args: &RunArgs) -> Result<ClientBuilder, String> {
    for path in &args.ca_cert {
        builder = builder.ca_certificate(read("--ca-cert", path)?);
    }
    match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => {
            builder = builder.identity(read("--client-cert", cert)?, read("--client-key", key)?);
        }
        // clap enforces both-or-neither; kept for a direct caller.
        (Some(_), None) => return Err("--client-cert needs --client-key".into()),
        (None, Some(_)) => return Err("--client-key needs --client-cert".into()),
        (None, None) => {}
    }
    if let Some(name) = &args.tls_domain {
        builder = builder.tls_domain(name.clone());
    }
    Ok(builder)
}

#[cfg(not(feature = "tls"))]
fn tls(builder: ClientBuilder, args: &RunArgs) -> Result<ClientBuilder, String> {
    if !args.ca_cert.is_empty()
        || args.client_cert.is_some()
        || args.client_key.is_some()
        || args.tls_domain.is_some()
    {
        return Err(
            "--ca-cert, --client-cert, --client-key and --tls-domain need TLS support: this \
             quorum-quest was built without the `tls` feature"
                .into(),
        );
    }
    Ok(builder)
}

/// The bearer token from `--token-file` or `--token-env`, trimmed.
fn token(args: &RunArgs) -> Result<Option<String>, String> {
    let (raw, source) = if let Some(path) = &args.token_file {
        let bytes = read("--token-file", path)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            format!(
                "--token-file {}: the file is not UTF-8 text",
                path.display()
            )
        })?;
        (text, format!("--token-file {}", path.display()))
    } else if let Some(var) = &args.token_env {
        let text = match std::env::var(var) {
            Ok(text) => text,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!(
                    "--token-env {var}: the environment variable is not set"
                ))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!(
                    "--token-env {var}: the environment variable is not UTF-8 text"
                ))
            }
        };
        (text, format!("--token-env {var}"))
    } else {
        return Ok(None);
    };
    let token = raw.trim();
    if token.is_empty() {
        return Err(format!("{source}: the token is empty"));
    }
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        // Not quoted: it is a secret.
        return Err(format!(
            "{source}: the token must be one line of visible ASCII (no spaces or control \
             characters)"
        ));
    }
    Ok(Some(token.to_string()))
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["quorum-quest", "run", "--service", "s", "--domain", "d"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["--", "true"]);
        match crate::args::Cli::parse_from(argv).command {
            crate::args::Command::Run(a) => *a,
            crate::args::Command::Server(_) => unreachable!("parsed `run`"),
        }
    }

    fn token_of(extra: &[&str]) -> Result<Option<String>, String> {
        token(&args(extra))
    }

    #[test]
    fn a_token_file_is_trimmed_and_bad_ones_are_errors_that_do_not_quote_it() {
        let dir = std::env::temp_dir().join(format!("qq-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_string_lossy().into_owned()
        };
        let good = file("good", b"s3cret\n");
        assert_eq!(
            token_of(&["--token-file", &good]),
            Ok(Some("s3cret".into()))
        );
        let crlf = file("crlf", b"  s3cret\r\n");
        assert_eq!(
            token_of(&["--token-file", &crlf]),
            Ok(Some("s3cret".into()))
        );
        let empty = file("empty", b"\n");
        assert!(token_of(&["--token-file", &empty])
            .unwrap_err()
            .contains("empty"));
        let spaced = file("spaced", b"hunter2 hunter3\n");
        let err = token_of(&["--token-file", &spaced]).unwrap_err();
        assert!(!err.contains("hunter"), "{err}");
        let binary = file("binary", &[0xff, 0xfe]);
        assert!(token_of(&["--token-file", &binary])
            .unwrap_err()
            .contains("UTF-8"));
        let missing = dir.join("missing").to_string_lossy().into_owned();
        let err = token_of(&["--token-file", &missing]).unwrap_err();
        assert!(
            err.starts_with("--token-file ") && err.contains("cannot read"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_env_var_must_be_set() {
        let err = token_of(&["--token-env", "QQ_SURELY_UNSET_VARIABLE_1234"]).unwrap_err();
        assert!(err.contains("not set"), "{err}");
    }
}
