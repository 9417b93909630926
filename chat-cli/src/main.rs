//! `chat-cli`: the securechat command line.
//!
//! Parses arguments, sends one request to the user's agentd over the local
//! socket and prints the answer (human text, or JSON with `--json`). It holds
//! no secret state of its own; passwords and codes go straight to agentd.
// The doc comments on the CLI types are `--help` text, written for a
// terminal rather than rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
#![forbid(unsafe_code)]

mod output;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use securechat_agentd::ipc_client::{IpcClient, IpcClientError};
use securechat_agentd::Paths;
use securechat_common::ipc::{IpcError, IpcRequest, IpcResponse};
use zeroize::Zeroizing;

/// Talk to your securechat agent (agentd).
///
/// Every command sends one request to agentd, which holds your key, your
/// session and your inbox. Start agentd first (`agentd --help`).
///
/// Getting started:
///   chat-cli register alice --email alice@example.org
///   chat-cli verify 123456         # code from the mail; shows a TOTP QR code
///   chat-cli login alice           # password + authenticator code, once
///   chat-cli send bob "hi"
///   chat-cli inbox
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// agentd's home directory [default: $XDG_DATA_HOME/securechat]; the same
    /// rule agentd uses finds its socket.
    #[arg(long, global = true, env = "SECURECHAT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an account: makes your key pair in agentd and mails a code.
    Register {
        /// Username: 3-32 of a-z 0-9 _ - . starting with a letter.
        user: String,
        /// Where the relay mails the verification code.
        #[arg(long)]
        email: String,
        /// Read the password from the first line of stdin instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Finish registering with the mailed code; shows your TOTP secret and QR code.
    Verify {
        /// The six-digit code from the mail.
        code: String,
    },
    /// Log in once (password + TOTP code); agentd keeps the session afterwards.
    Login {
        /// Your username.
        user: String,
        /// Read the password from the first line of stdin instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// The current code from your authenticator app (prompted if missing).
        #[arg(long)]
        totp: Option<String>,
    },
    /// Send a message; returns once the relay has stored it durably.
    Send {
        /// Recipient username.
        user: String,
        /// Message text; `-` reads it from stdin.
        text: String,
    },
    /// Show unread messages (sender, time, text) and mark them read.
    Inbox {
        /// Show read messages too.
        #[arg(long)]
        all: bool,
    },
    /// List users connected to the relay now.
    Online,
    /// Send a message to everyone online (sealed for each of them).
    Broadcast {
        /// Message text; `-` reads it from stdin.
        text: String,
    },
    /// Show agentd's state: connection, account, key, unread, problems.
    Status,
    /// End the session on the relay.
    Logout,
    /// Show your key's fingerprint, or a contact's pinned and current one.
    Fingerprint {
        /// The contact (omit for your own key).
        user: Option<String>,
    },
    /// Accept a contact's changed key (check the fingerprint with them first).
    Trust {
        /// The contact.
        user: String,
    },
    /// Make a new key pair and publish it (needs password + TOTP code).
    RotateKey {
        /// Read the password from the first line of stdin instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// The current TOTP code (prompted if missing).
        #[arg(long)]
        totp: Option<String>,
    },
    /// Unlock a passphrase-protected identity key after agentd starts.
    Unlock {
        /// Read the passphrase from the first line of stdin.
        #[arg(long)]
        passphrase_stdin: bool,
    },
    /// Protect the identity key on disk with a passphrase (or remove it).
    Passphrase {
        /// Remove the passphrase (store the key unencrypted, 0600).
        #[arg(long)]
        remove: bool,
        /// Read the passphrase from the first line of stdin.
        #[arg(long)]
        passphrase_stdin: bool,
    },
    /// Chat interactively: each line you type is sent; replies appear as they arrive.
    Chat {
        /// The contact.
        user: String,
    },
}

/// A failure with its typed agent error, if there is one.
struct Failure {
    error: anyhow::Error,
    agent: Option<IpcError>,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let agent = match error.downcast_ref::<IpcClientError>() {
            Some(IpcClientError::Agent(e)) => Some(e.clone()),
            _ => None,
        };
        Self { error, agent }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                let value = match &f.agent {
                    Some(e) => serde_json::json!({ "error": e }),
                    None => {
                        serde_json::json!({ "error": { "kind": "client", "message": format!("{:#}", f.error) } })
                    }
                };
                eprintln!("{value}");
            } else if let Some(e) = &f.agent {
                eprintln!("chat-cli: {}", e.message);
            } else {
                eprintln!("chat-cli: {:#}", f.error);
            }
            ExitCode::FAILURE
        }
    }
}

fn read_stdin_line(what: &str) -> Result<Zeroizing<String>> {
    let mut line = Zeroizing::new(String::new());
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .with_context(|| format!("reading the {what} from stdin"))?;
    let trimmed = Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_string());
    if trimmed.is_empty() {
        bail!("no {what} on stdin");
    }
    Ok(trimmed)
}

fn prompt_secret(prompt: &str) -> Result<Zeroizing<String>> {
    let value =
        Zeroizing::new(rpassword::prompt_password(prompt).context("reading from the terminal")?);
    if value.is_empty() {
        bail!("nothing entered");
    }
    Ok(value)
}

fn secret(from_stdin: bool, what: &str, confirm: bool) -> Result<Zeroizing<String>> {
    if from_stdin {
        return read_stdin_line(what);
    }
    let first = prompt_secret(&format!("{}: ", capitalise(what)))?;
    if confirm {
        let again = prompt_secret(&format!("{} again: ", capitalise(what)))?;
        if *again != *first {
            bail!("the two {what}s differ");
        }
    }
    Ok(first)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn totp_code(given: Option<String>) -> Result<Zeroizing<String>> {
    match given {
        Some(code) => Ok(Zeroizing::new(code)),
        None => {
            eprint!("TOTP code from your authenticator app: ");
            std::io::stderr().flush().ok();
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the TOTP code")?;
            Ok(Zeroizing::new(line.trim().to_string()))
        }
    }
}

fn message_text(text: String) -> Result<String> {
    if text != "-" {
        return Ok(text);
    }
    let mut buf = String::new();
    std::io::stdin()
        .take(securechat_common::limits::MAX_MESSAGE_LEN as u64 + 1)
        .read_to_string(&mut buf)
        .context("reading the message from stdin")?;
    Ok(buf.strip_suffix('\n').map(str::to_string).unwrap_or(buf))
}

async fn connect(paths: &Paths) -> Result<IpcClient> {
    match IpcClient::connect(&paths.socket).await {
        Ok(c) => Ok(c),
        Err(IpcClientError::NotRunning(sock)) => bail!(
            "agentd is not running (no socket at {}).\nStart it with:\n  agentd --home {} \
             --relay HOST:PORT --relay-fingerprint SHA256\nor, as a service:\n  systemctl --user \
             start securechat-agentd",
            sock.display(),
            paths.home.display()
        ),
        Err(e) => Err(e.into()),
    }
}

fn print(json: bool, resp: &IpcResponse) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, resp)?;
        writeln!(out)?;
    } else {
        out.write_all(output::human(resp).as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let paths = Paths::resolve(cli.home.clone())?;
    let json = cli.json;
    // Secrets and stdin are read before connecting, so prompts come first.
    let request = match cli.command {
        Command::Register {
            user,
            email,
            password_stdin,
        } => IpcRequest::Register {
            username: user,
            email,
            password: secret(password_stdin, "password", true)?,
        },
        Command::Verify { code } => IpcRequest::Verify {
            code: Zeroizing::new(code),
        },
        Command::Login {
            user,
            password_stdin,
            totp,
        } => {
            let password = secret(password_stdin, "password", false)?;
            IpcRequest::Login {
                username: user,
                password,
                totp: totp_code(totp)?,
            }
        }
        Command::Send { user, text } => IpcRequest::Send {
            to: user,
            text: message_text(text)?,
        },
        Command::Inbox { all } => IpcRequest::Inbox { all },
        Command::Online => IpcRequest::Online,
        Command::Broadcast { text } => IpcRequest::Broadcast {
            text: message_text(text)?,
        },
        Command::Status => IpcRequest::Status,
        Command::Logout => IpcRequest::Logout,
        Command::Fingerprint { user } => IpcRequest::Fingerprint { user },
        Command::Trust { user } => IpcRequest::Trust { user },
        Command::RotateKey {
            password_stdin,
            totp,
        } => {
            let password = secret(password_stdin, "password", false)?;
            IpcRequest::RotateKey {
                password,
                totp: totp_code(totp)?,
            }
        }
        Command::Unlock { passphrase_stdin } => IpcRequest::Unlock {
            passphrase: secret(passphrase_stdin, "passphrase", false)?,
        },
        Command::Passphrase {
            remove,
            passphrase_stdin,
        } => IpcRequest::SetPassphrase {
            passphrase: if remove {
                None
            } else {
                Some(secret(passphrase_stdin, "passphrase", !passphrase_stdin)?)
            },
        },
        Command::Chat { user } => {
            let rt = runtime()?;
            return rt.block_on(chat(&paths, user, json));
        }
    };
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = connect(&paths).await?;
        let resp = client.request(&request).await?;
        print(json, &resp)?;
        if let IpcResponse::Broadcast { failed, .. } = &resp {
            if !failed.is_empty() {
                return Err(anyhow::anyhow!("{} recipient(s) were skipped", failed.len()).into());
            }
        }
        Ok(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Interactive chat: stdin lines are sent to `user`; their messages are
/// printed as they arrive.
async fn chat(paths: &Paths, user: String, json: bool) -> Result<(), Failure> {
    use tokio::io::AsyncBufReadExt;
    let mut sender = connect(paths).await?;
    let mut watcher = connect(paths).await?;
    watcher
        .request(&IpcRequest::Watch {
            from: Some(user.clone()),
        })
        .await?;
    if !json && std::io::stdin().is_terminal() {
        eprintln!("chatting with {user}; type a line and press Enter to send, Ctrl-D to quit");
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            incoming = watcher.next() => print(json, &incoming?)?,
            line = lines.next_line() => {
                let Some(line) = line.context("reading stdin")? else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let req = IpcRequest::Send { to: user.clone(), text: line };
                match sender.request(&req).await {
                    Ok(resp) => {
                        if json {
                            print(json, &resp)?;
                        }
                    }
                    Err(IpcClientError::Agent(e)) => eprintln!("chat-cli: not sent: {}", e.message),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}
