//! Limits shared by the relay and the agent, and the input rules behind them.
//!
//! Both sides check the same numbers so that a message the agent accepts to
//! send is never refused by the relay for size, and so that a peer that
//! ignores them is refused before anything is allocated.

/// Largest encoded frame (length prefix excluded) either side accepts.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Largest plaintext message body, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Largest envelope ciphertext: the body plus the AEAD tag.
pub const MAX_CIPHERTEXT_LEN: usize = MAX_MESSAGE_LEN + 16;

/// Most recipients one envelope is sealed for; a broadcast to more users
/// is sealed once per group of this many. Bounds the envelope (each slot
/// carries a wrapped key of up to [`MAX_RSA_OUTPUT_LEN`] bytes) well below
/// [`MAX_FRAME_LEN`].
pub const MAX_RECIPIENTS: usize = 256;

/// Most message ids one delivery receipt names.
pub const MAX_RECEIPT_IDS: usize = 1024;

/// Most messages one [`crate::protocol::Request::AckMany`] confirms. Each
/// entry is 17 bytes on the wire, so a full batch stays far below
/// [`MAX_FRAME_LEN`]; the bound keeps one request's transaction on the
/// relay short, so that other users' sends are not held up behind it.
pub const MAX_ACK_BATCH: usize = 1024;

/// Most users one connection watches for presence
/// ([`crate::protocol::Request::WatchPresence`]): an agent's contacts,
/// bounded so the relay's watch lists stay proportional to its connections.
pub const MAX_WATCH: usize = 1024;

/// Largest RSA output (wrapped key or signature): a 4096-bit modulus.
pub const MAX_RSA_OUTPUT_LEN: usize = 512;

/// Largest DER public key accepted (a 4096-bit SPKI is about 550 bytes).
pub const MAX_PUBLIC_KEY_LEN: usize = 1024;

/// RSA modulus sizes accepted for identity keys, in bits.
pub const ALLOWED_RSA_BITS: [usize; 3] = [2048, 3072, 4096];

/// Username length bounds, in characters.
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;

/// Password length bounds, in bytes.
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;

/// Longest email address accepted (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// Seconds after a full login during which the key may be replaced.
pub const FRESH_LOGIN_SECS: u64 = 300;

/// Check a username against the documented rules: 3 to 32 characters of
/// lowercase ASCII letters, digits, `_`, `-` and `.`, starting with a letter.
///
/// Lowercase only, so that `Alice` and `alice` can never be two people.
pub fn validate_username(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if !USERNAME_LEN.contains(&len) {
        return Err(format!(
            "username must be {} to {} characters long, got {len}",
            USERNAME_LEN.start(),
            USERNAME_LEN.end()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("username must start with a lowercase letter (a-z)".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(*c)))
    {
        return Err(format!(
            "username may only contain a-z, 0-9, '_', '-' and '.', found {bad:?}"
        ));
    }
    Ok(())
}

/// A plausibility check of an email address: one `@`, a non-empty local
/// part, a dotted domain, no spaces or control characters. Delivery is the
/// real test; this only catches typos early.
pub fn validate_email(addr: &str) -> Result<(), String> {
    if addr.len() > MAX_EMAIL_LEN {
        return Err(format!("email address longer than {MAX_EMAIL_LEN} bytes"));
    }
    if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("email address must not contain spaces or control characters".into());
    }
    let Some((local, domain)) = addr.split_once('@') else {
        return Err("email address must contain '@'".into());
    };
    if local.is_empty() || domain.contains('@') {
        return Err("email address must have exactly one '@' after a non-empty local part".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
        return Err(format!(
            "email domain {domain:?} is not a dotted domain name"
        ));
    }
    Ok(())
}

/// Check a password's length (bytes): long enough to matter, short enough
/// that hashing it is not a denial of service.
pub fn validate_password(password: &str) -> Result<(), String> {
    if !PASSWORD_LEN.contains(&password.len()) {
        return Err(format!(
            "password must be {} to {} bytes long",
            PASSWORD_LEN.start(),
            PASSWORD_LEN.end()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["alice", "bob_2", "a.b-c", "abc"] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ab",
            "Alice",
            "1abc",
            "al ice",
            "al/ice",
            "ålice",
            &"a".repeat(33),
        ] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn emails() {
        assert!(validate_email("alice@example.org").is_ok());
        for bad in [
            "alice",
            "@example.org",
            "a@b",
            "a@@b.c",
            "a b@c.d",
            "a@b..c",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords() {
        assert!(validate_password("short").is_err());
        assert!(validate_password("long enough").is_ok());
        assert!(validate_password(&"x".repeat(2000)).is_err());
    }
}
