//! Account secrets: password hashes, TOTP, emailed codes, session tokens.
//!
//! * passwords: argon2id with the OWASP parameters (19 MiB, 2 passes, 1 lane),
//!   stored as a PHC string; hashing is slow on purpose, so it runs on the
//!   relay's own password workers ([`crate::password_pool`]). [`Passwords::verify_unknown_user`] spends the same time
//!   on a dummy hash, so an unknown name and a wrong password look alike;
//! * TOTP: RFC 6238, SHA-1, 6 digits, 30 s steps, ±1 step accepted; the
//!   matched step is returned so the caller can refuse it the second time;
//! * emailed codes: 6 random digits, only their SHA-256 is stored;
//! * session tokens: 32 random bytes, only their SHA-256 is stored.

use std::cell::RefCell;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use securechat_common::crypto::{random_bytes, sha256, CryptoError};
use totp_rs::TOTP;
use zeroize::Zeroizing;

/// TOTP issuer shown in authenticator apps.
pub const TOTP_ISSUER: &str = "securechat";
/// TOTP time step, seconds.
pub const TOTP_STEP_SECS: u64 = 30;
/// TOTP secret length, bytes (160 bits, as RFC 4226 recommends).
pub const TOTP_SECRET_LEN: usize = 20;

/// Why an account secret operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// The system random generator failed.
    #[error("random generation failed")]
    Random(#[from] CryptoError),
    /// argon2 refused the parameters or input.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The TOTP parameters were refused.
    #[error("TOTP setup failed: {0}")]
    Totp(String),
    /// The password worker threads could not be started.
    #[error("cannot start the password worker threads: {0}")]
    Workers(std::io::Error),
}

thread_local! {
    /// argon2's working memory (19 MiB), allocated once per password worker
    /// and kept for the thread's life. Allocated per check, glibc kept the
    /// freed blocks in heaps it does not give back (its mmap threshold grows
    /// to the largest freed block), and a burst of logins left the relay's
    /// resident memory hundreds of MiB higher for good.
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Run argon2 `argon` over `password` and `salt` into `out`, in this
/// thread's [`MEMORY`].
fn argon2_into(
    argon: &Argon2<'_>,
    params: &Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        let blocks = params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        argon.hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
    })
}

/// argon2id hashing with fixed parameters and a dummy hash for unknown users.
pub struct Passwords {
    argon: Argon2<'static>,
    params: Params,
    dummy_phc: String,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(argon2id)")
    }
}

impl Passwords {
    /// Set up the hasher (computes the dummy hash once; slow).
    pub fn new() -> Result<Self, AccountError> {
        let params =
            Params::new(19 * 1024, 2, 1, None).map_err(|e| AccountError::Hash(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let mut this = Self {
            argon,
            params,
            dummy_phc: String::new(),
        };
        let dummy = hex::encode(random_bytes::<16>()?);
        this.dummy_phc = this.hash(&dummy)?;
        Ok(this)
    }

    /// Hash a password into a PHC string with a fresh random salt.
    pub fn hash(&self, password: &str) -> Result<String, AccountError> {
        let hash_err = |e: &dyn std::fmt::Display| AccountError::Hash(e.to_string());
        let salt_bytes = random_bytes::<16>()?;
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| hash_err(&e))?;
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        argon2_into(
            &self.argon,
            &self.params,
            password.as_bytes(),
            &salt_bytes,
            &mut out,
        )
        .map_err(|e| hash_err(&e))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params).map_err(|e| hash_err(&e))?,
            salt: Some(salt.as_salt()),
            hash: Some(Output::new(&out).map_err(|e| hash_err(&e))?),
        };
        Ok(phc.to_string())
    }

    /// Check a password against a stored PHC string (with the parameters
    /// it names).
    pub fn verify(&self, phc: &str, password: &str) -> bool {
        let check = || -> Option<bool> {
            let hash = PasswordHash::new(phc).ok()?;
            let expected = hash.hash?;
            let mut salt_buf = [0u8; 64];
            let salt = hash.salt?.decode_b64(&mut salt_buf).ok()?;
            let params = Params::try_from(&hash).ok()?;
            let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
            let version = match hash.version {
                Some(v) => Version::try_from(v).ok()?,
                None => Version::default(),
            };
            let argon = Argon2::new(algorithm, version, params.clone());
            let mut out = vec![0u8; expected.len()];
            argon2_into(&argon, &params, password.as_bytes(), salt, &mut out).ok()?;
            // Output compares in constant time.
            Some(Output::new(&out).ok()? == expected)
        };
        check().unwrap_or(false)
    }

    /// Spend the time of one verification for a user that does not exist.
    pub fn verify_unknown_user(&self, password: &str) {
        let _ = self.verify(&self.dummy_phc, password);
    }
}

/// A new random TOTP secret.
pub fn new_totp_secret() -> Result<Zeroizing<Vec<u8>>, AccountError> {
    Ok(Zeroizing::new(random_bytes::<TOTP_SECRET_LEN>()?.to_vec()))
}

/// The TOTP generator for an account.
pub fn totp(secret: &[u8], username: &str) -> Result<TOTP, AccountError> {
    TOTP::new(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        TOTP_STEP_SECS,
        secret.to_vec(),
        Some(TOTP_ISSUER.into()),
        username.to_string(),
    )
    .map_err(|e| AccountError::Totp(e.to_string()))
}

/// If `code` is valid at `now` (±1 step), the time step it belongs to.
pub fn check_totp(totp: &TOTP, code: &str, now_unix: u64) -> Option<u64> {
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = now_unix / TOTP_STEP_SECS;
    let mut matched = None;
    // Check every candidate so the time does not depend on which matched.
    for candidate in [step.saturating_sub(1), step, step + 1] {
        let expected = totp.generate(candidate * TOTP_STEP_SECS);
        if aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), code.as_bytes())
            .is_ok()
        {
            matched = Some(candidate);
        }
    }
    matched
}

/// A fresh six-digit verification code.
pub fn new_code() -> Result<Zeroizing<String>, AccountError> {
    // 2^64 is so much larger than 10^6 that the modulo bias is negligible.
    let n = u64::from_be_bytes(random_bytes::<8>()?) % 1_000_000;
    Ok(Zeroizing::new(format!("{n:06}")))
}

/// What is stored for a verification code.
pub fn code_hash(code: &str) -> [u8; 32] {
    sha256(code.trim().as_bytes())
}

/// Compare a submitted code with a stored hash in constant time.
pub fn code_matches(code: &str, stored: &[u8; 32]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(&code_hash(code), stored).is_ok()
}

/// A new session token and the hash it is stored under.
pub fn new_token() -> Result<(Zeroizing<Vec<u8>>, [u8; 32]), AccountError> {
    let token = Zeroizing::new(random_bytes::<32>()?.to_vec());
    let hash = sha256(&token);
    Ok((token, hash))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trip() {
        let pw = Passwords::new().unwrap();
        let phc = pw.hash("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(pw.verify(&phc, "correct horse"));
        assert!(!pw.verify(&phc, "wrong horse"));
        assert!(!pw.verify("not a phc string", "correct horse"));
        pw.verify_unknown_user("anything");
    }

    #[test]
    fn hashes_match_the_argon2_crates_own_phc_strings() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let pw = Passwords::new().unwrap();
        // Stored before the working memory was kept per thread: still good.
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        let old = pw
            .argon
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(pw.verify(&old, "correct horse"));
        assert!(!pw.verify(&old, "correct horsf"));
        // Made now: the crate's verifier agrees.
        let new = pw.hash("correct horse").unwrap();
        let parsed = PasswordHash::new(&new).unwrap();
        assert!(pw.argon.verify_password(b"correct horse", &parsed).is_ok());
        assert!(pw.argon.verify_password(b"wrong horse", &parsed).is_err());
        // Other parameters named in the string are honoured.
        let light = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        );
        let other = light.hash_password(b"pw", &salt).unwrap().to_string();
        assert!(pw.verify(&other, "pw"));
        assert!(!pw.verify(&other, "px"));
    }

    #[test]
    fn totp_accepts_adjacent_steps_only() {
        let secret = new_totp_secret().unwrap();
        let t = totp(&secret, "alice").unwrap();
        // A time at which the codes of the five steps around it all differ,
        // so that "refused" below cannot be a chance match of another step
        // (two six-digit codes agree once in a million).
        let mut now = 1_700_000_000;
        let distinct = |now: u64| {
            let codes: Vec<String> = (0..5)
                .map(|i| t.generate((now / TOTP_STEP_SECS + i - 2) * TOTP_STEP_SECS))
                .collect();
            codes
                .iter()
                .enumerate()
                .all(|(i, c)| !codes[i + 1..].contains(c))
        };
        while !distinct(now) {
            now += TOTP_STEP_SECS;
        }
        let step = now / TOTP_STEP_SECS;
        for (offset, ok) in [(-2i64, false), (-1, true), (0, true), (1, true), (2, false)] {
            let at = step.checked_add_signed(offset).unwrap();
            let code = t.generate(at * TOTP_STEP_SECS);
            let want = ok.then_some(at);
            assert_eq!(check_totp(&t, &code, now), want, "offset {offset}");
        }
        // A wrong six-digit code: any code that no step in the window has.
        let window: Vec<String> = (step - 1..=step + 1)
            .map(|s| t.generate(s * TOTP_STEP_SECS))
            .collect();
        let wrong = (0..1_000_000u32)
            .map(|n| format!("{n:06}"))
            .find(|c| !window.contains(c))
            .unwrap();
        assert_eq!(check_totp(&t, &wrong, now), None);
        // The right code with anything around it is not the right code.
        let right = t.generate(now);
        assert_eq!(check_totp(&t, &format!(" {right}"), now), None);
        assert_eq!(check_totp(&t, &format!("{right}0"), now), None);
        assert_eq!(check_totp(&t, "12345", now), None);
        assert_eq!(check_totp(&t, "abcdef", now), None);
        assert_eq!(check_totp(&t, "", now), None);
        assert!(t.get_url().starts_with("otpauth://totp/securechat:alice?"));
    }

    #[test]
    fn codes_are_six_digits_and_hashed() {
        let code = new_code().unwrap();
        assert_eq!(code.len(), 6);
        assert!(code.bytes().all(|b| b.is_ascii_digit()));
        let stored = code_hash(&code);
        assert!(code_matches(&code, &stored));
        assert!(!code_matches("999999x", &stored));
    }
}
