//! `chat-cli`: the securechat command line.
//!
//! Parses arguments, sends one request to the user's agentd over the local
//! socket and prints the answer (human text, or JSON with `--json`). It holds
//! no secret state of its own; passwords and codes go straight to agentd.
// The doc comments on the CLI types are `--help` text, written for a
// terminal rather than rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
#![forbid(unsafe_code)]

mod chat;
mod cli;
mod doctor;
mod failure;
mod feed;
mod follow;
mod history;
mod link;
mod output;
mod render;
mod when;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use failure::Failure;
use link::{connect, mark_read};
use securechat_client::ipc::{IpcClient, IpcClientError};
use securechat_client::Paths;
use securechat_common::ipc::{ConnectionState, IpcErrorKind, IpcRequest, IpcResponse, StatusInfo};
use zeroize::Zeroizing;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                let value = match (&f.json, &f.agent) {
                    (Some(v), _) => serde_json::json!({ "error": v }),
                    (None, Some(e)) => serde_json::json!({ "error": e }),
                    (None, None) => {
                        serde_json::json!({ "error": { "kind": "client", "message": format!("{:#}", f.error) } })
                    }
                };
                eprintln!("{value}");
            } else if let Some(e) = &f.agent {
                // The message may quote the relay or another user.
                eprintln!("chat-cli: {}", output::sanitize(&e.message));
            } else {
                eprintln!("chat-cli: {}", output::sanitize(&format!("{:#}", f.error)));
            }
            ExitCode::from(f.exit)
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

/// Fail at once when a secret would have to be prompted for and stdin is
/// no terminal (a pipe, cron, CI): a prompt there would hang or read junk.
fn require_terminal(from_stdin: bool, what: &str) -> Result<(), Failure> {
    if from_stdin || std::io::stdin().is_terminal() {
        return Ok(());
    }
    Err(Failure::refuse(
        IpcErrorKind::InvalidInput,
        format!("no terminal to ask for the {what}; pipe it and pass --{what}-stdin"),
    ))
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

/// Refuse an empty message (or one of only whitespace) before agentd is
/// asked: there is nothing to send.
fn refuse_empty(text: &str) -> Result<(), Failure> {
    if text.trim().is_empty() {
        return Err(Failure::refuse(
            IpcErrorKind::InvalidInput,
            "the message is empty; nothing was sent (write some text, or `-` to read it from \
             stdin)",
        ));
    }
    Ok(())
}

fn message_text(text: String) -> Result<String> {
    if text != "-" {
        return Ok(text);
    }
    if std::io::stdin().is_terminal() {
        eprintln!("Type the message; end with Ctrl-D on a line of its own.");
    }
    let mut buf = String::new();
    std::io::stdin()
        .take(securechat_common::limits::MAX_MESSAGE_LEN as u64 + 1)
        .read_to_string(&mut buf)
        .context("reading the message from stdin")?;
    Ok(buf.strip_suffix('\n').map(str::to_string).unwrap_or(buf))
}

fn print(json: bool, resp: &IpcResponse) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, resp)?;
        writeln!(out)?;
    } else {
        out.write_all(output::sanitize(&output::human(resp)).as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// `inbox`: print each message as it streams in, and only after all are
/// printed (and stdout flushed) mark them read.
async fn inbox(paths: &Paths, json: bool, all: bool, from: Option<String>) -> Result<(), Failure> {
    let mut client = connect(paths).await?;
    client.send(&IpcRequest::Inbox { all, from }).await?;
    let mut shown = Vec::new();
    let mut collected = Vec::new();
    let mut printed = 0u64;
    loop {
        match client.next().await? {
            IpcResponse::Message(m) => {
                printed += 1;
                if !m.read {
                    shown.push(m.id.clone());
                }
                if json {
                    collected.push(m);
                } else {
                    print(false, &IpcResponse::Message(m))?;
                }
            }
            IpcResponse::End { .. } => break,
            other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
        }
    }
    if json {
        let doc = serde_json::json!({ "response": "inbox", "messages": collected });
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &doc)?;
        writeln!(out)?;
        out.flush()?;
    } else if printed == 0 {
        println!(
            "{}",
            if all {
                "no messages"
            } else {
                "no new messages"
            }
        );
    }
    mark_read(&mut client, shown).await?;
    Ok(())
}

/// `held`: every message held because its sender's key changed.
async fn held(paths: &Paths, json: bool) -> Result<(), Failure> {
    let mut client = connect(paths).await?;
    client.send(&IpcRequest::Held).await?;
    let mut collected = Vec::new();
    loop {
        match client.next().await? {
            IpcResponse::Held(p) => {
                if json {
                    collected.push(p);
                } else {
                    print(false, &IpcResponse::Held(p))?;
                }
            }
            IpcResponse::End { count } => {
                if json {
                    let doc = serde_json::json!({ "response": "held", "messages": collected });
                    println!("{doc}");
                } else if count == 0 {
                    println!("no held messages");
                }
                return Ok(());
            }
            other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
        }
    }
}

/// `trust USER [FINGERPRINT]`: without a fingerprint, show the directory's
/// and ask the user at the terminal to confirm exactly that one.
async fn trust(
    paths: &Paths,
    json: bool,
    user: String,
    fingerprint: Option<String>,
) -> Result<(), Failure> {
    let mut client = connect(paths).await?;
    let fingerprint = match fingerprint {
        Some(f) => f,
        None => {
            if json || !std::io::stdin().is_terminal() {
                return Err(anyhow::anyhow!(
                    "give the fingerprint you checked with {user}: chat-cli trust {user} \
                     <fingerprint> (`chat-cli fingerprint {user}` shows the relay's)"
                )
                .into());
            }
            let info = client
                .request(&IpcRequest::Fingerprint {
                    user: Some(user.clone()),
                })
                .await?;
            let IpcResponse::Fingerprint(info) = info else {
                return Err(anyhow::anyhow!("unexpected answer from agentd: {info:?}").into());
            };
            let Some(directory) = info.directory else {
                return Err(anyhow::anyhow!(
                    "the relay's directory could not be asked for {user}'s key; try again when \
                     agentd is connected"
                )
                .into());
            };
            eprintln!(
                "{}",
                output::sanitize(&format!(
                    "The relay's directory gives {user} the key\n\n    {directory}\n\nCompare it \
                     with what {user} reads out from `chat-cli fingerprint` on their side."
                ))
            );
            eprint!(
                "Pin exactly this key for {}? Type yes: ",
                output::sanitize(&user)
            );
            std::io::stderr().flush().ok();
            let mut answer = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut answer)
                .context("reading the answer")?;
            if answer.trim() != "yes" {
                return Err(anyhow::anyhow!("nothing was trusted").into());
            }
            directory
        }
    };
    let resp = client
        .request(&IpcRequest::Trust { user, fingerprint })
        .await?;
    print(json, &resp)?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let paths = Paths::resolve(cli.home.clone())?;
    let json = cli.json;
    when::use_zone(if cli.utc {
        when::Zone::Utc
    } else {
        when::Zone::Local
    });
    let request = match cli.command {
        command @ (Command::Register { .. }
        | Command::Login { .. }
        | Command::RotateKey { .. }
        | Command::Unlock { .. }
        | Command::Passphrase { .. }) => {
            return runtime()?.block_on(ask_then_request(&paths, json, command));
        }
        Command::Verify { code } => IpcRequest::Verify {
            code: Zeroizing::new(code),
        },
        Command::Send { user, text } => {
            return runtime()?.block_on(send(&paths, json, user, text));
        }
        Command::Inbox {
            all,
            from,
            follow: false,
        } => {
            return runtime()?.block_on(inbox(&paths, json, all, from));
        }
        Command::Inbox {
            all,
            from,
            follow: true,
        } => {
            return runtime()?.block_on(follow::inbox(&paths, json, all, from));
        }
        Command::History { user, limit } => {
            return runtime()?.block_on(history::history(&paths, json, user, limit));
        }
        Command::Contacts => return runtime()?.block_on(history::contacts(&paths, json)),
        Command::Events { after } => {
            return runtime()?.block_on(follow::events(&paths, json, after));
        }
        Command::Held => return runtime()?.block_on(held(&paths, json)),
        Command::Online => IpcRequest::Online,
        Command::Broadcast { text } => {
            return runtime()?.block_on(async {
                // agentd answers before the user is asked to type anything.
                refuse_empty(&text)?;
                let mut client = connect(&paths).await?;
                let text = message_text(text)?;
                refuse_empty(&text)?;
                let request = IpcRequest::Broadcast { text };
                let resp = client.request(&request).await?;
                print(json, &resp)?;
                if let IpcResponse::Broadcast { failed, .. } = &resp {
                    if !failed.is_empty() {
                        return Err(
                            anyhow::anyhow!("{} recipient(s) were skipped", failed.len()).into(),
                        );
                    }
                }
                Ok(())
            });
        }
        Command::Status => IpcRequest::Status,
        Command::Logout => IpcRequest::Logout,
        Command::Fingerprint { user } => IpcRequest::Fingerprint { user },
        Command::Trust { user, fingerprint } => {
            return runtime()?.block_on(trust(&paths, json, user, fingerprint));
        }
        Command::Chat { user } => {
            if json {
                return Err(Failure::refuse(
                    IpcErrorKind::InvalidInput,
                    "chat is for people and has no --json; scripts use `chat-cli events --json` \
                     to follow and `chat-cli send` or `broadcast` to write",
                ));
            }
            return runtime()?.block_on(chat::run(&paths, user));
        }
        Command::Doctor => return runtime()?.block_on(doctor::run(&paths, json)),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            // Into memory first: the generator panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "chat-cli", &mut script);
            std::io::stdout().lock().write_all(&script)?;
            return Ok(());
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout().lock())?;
            return Ok(());
        }
    };
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = connect(&paths).await?;
        let resp = client.request(&request).await?;
        print(json, &resp)
    })?;
    Ok(())
}

/// agentd's status, on an open connection.
async fn status(client: &mut IpcClient) -> Result<StatusInfo, Failure> {
    match client.request(&IpcRequest::Status).await? {
        IpcResponse::Status(s) => Ok(*s),
        other => Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
    }
}

/// The commands that need a secret. agentd must answer, and the request
/// make sense as far as its status tells, before anything is asked: nobody
/// types a password for an agent that is not running, or for a login it
/// would refuse.
async fn ask_then_request(paths: &Paths, json: bool, command: Command) -> Result<(), Failure> {
    use securechat_common::limits::{validate_email, validate_username};
    let invalid = |e: String| Failure::refuse(IpcErrorKind::InvalidInput, e);
    // What can be refused without agentd comes first.
    match &command {
        Command::Register {
            user,
            email,
            password_stdin,
        } => {
            validate_username(user).map_err(invalid)?;
            validate_email(email).map_err(invalid)?;
            require_terminal(*password_stdin, "password")?;
        }
        Command::Login {
            user,
            password_stdin,
            ..
        } => {
            validate_username(user).map_err(invalid)?;
            require_terminal(*password_stdin, "password")?;
        }
        Command::RotateKey { password_stdin, .. } => require_terminal(*password_stdin, "password")?,
        Command::Unlock { passphrase_stdin } => require_terminal(*passphrase_stdin, "passphrase")?,
        Command::Passphrase {
            remove: false,
            passphrase_stdin,
        } => require_terminal(*passphrase_stdin, "passphrase")?,
        _ => {}
    }
    let mut client = connect(paths).await?;
    let s = status(&mut client).await?;
    let logged_in = s.connection == ConnectionState::LoggedIn;
    let no_relay = || {
        Failure::refuse(
            IpcErrorKind::NoRelay,
            "agentd has no relay configured; restart it with --relay HOST:PORT \
             --relay-fingerprint SHA256",
        )
    };
    let locked = || {
        Failure::refuse(
            IpcErrorKind::Locked,
            "the identity key is passphrase-protected; run `chat-cli unlock` first",
        )
    };
    let no_key = || {
        Failure::refuse(
            IpcErrorKind::NotRegistered,
            "no identity key yet; run `chat-cli register <user> --email <addr>` first",
        )
    };
    let request = match command {
        Command::Register {
            user,
            email,
            password_stdin,
        } => {
            if s.connection == ConnectionState::NoRelay {
                return Err(no_relay());
            }
            if logged_in {
                return Err(Failure::refuse(
                    IpcErrorKind::AlreadyLoggedIn,
                    "this agent is logged in to an account already; `chat-cli logout` first",
                ));
            }
            if s.locked {
                return Err(locked());
            }
            IpcRequest::Register {
                username: user,
                email,
                password: secret(password_stdin, "password", true)?,
            }
        }
        Command::Login {
            user,
            password_stdin,
            totp,
        } => {
            if s.connection == ConnectionState::NoRelay {
                return Err(no_relay());
            }
            if logged_in {
                return Err(Failure::refuse(
                    IpcErrorKind::AlreadyLoggedIn,
                    format!(
                        "already logged in as {}; agentd keeps the session (run `chat-cli \
                         logout` to end it)",
                        s.username.as_deref().unwrap_or("?")
                    ),
                ));
            }
            if s.locked {
                return Err(locked());
            }
            if !s.has_key {
                return Err(no_key());
            }
            let password = secret(password_stdin, "password", false)?;
            IpcRequest::Login {
                username: user,
                password,
                totp: totp_code(totp)?,
            }
        }
        Command::RotateKey {
            password_stdin,
            totp,
        } => {
            if s.locked {
                return Err(locked());
            }
            if !logged_in {
                return Err(Failure::refuse(
                    IpcErrorKind::NotLoggedIn,
                    "rotate-key needs agentd logged in and connected to the relay; check \
                     `chat-cli status` (run `chat-cli login <user>` if needed)",
                ));
            }
            let password = secret(password_stdin, "password", false)?;
            IpcRequest::RotateKey {
                password,
                totp: totp_code(totp)?,
            }
        }
        Command::Unlock { passphrase_stdin } => {
            if !s.has_key {
                return Err(no_key());
            }
            if !s.locked {
                if json {
                    return print(true, &IpcResponse::Ok).map_err(Into::into);
                }
                println!("the identity key is not locked; nothing to unlock");
                return Ok(());
            }
            IpcRequest::Unlock {
                passphrase: secret(passphrase_stdin, "passphrase", false)?,
            }
        }
        Command::Passphrase {
            remove,
            passphrase_stdin,
        } => {
            if s.locked {
                return Err(locked());
            }
            if !s.has_key {
                return Err(no_key());
            }
            IpcRequest::SetPassphrase {
                passphrase: if remove {
                    None
                } else {
                    Some(secret(passphrase_stdin, "passphrase", !passphrase_stdin)?)
                },
            }
        }
        _ => return Err(anyhow::anyhow!("not a command that asks for a secret").into()),
    };
    let resp = client.request(&request).await?;
    print(json, &resp)?;
    Ok(())
}

/// How long chat-cli waits, after Ctrl-C, for agentd to say whether the
/// message could still be withdrawn.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `send`: agentd answers first (then the text is read), takes the message
/// as an id, and sends it. Ctrl-C while waiting withdraws it if it has not
/// reached the relay yet, and otherwise says plainly that it may still be
/// delivered, with its id, so that a retry is not a blind duplicate.
async fn send(paths: &Paths, json: bool, to: String, text: String) -> Result<(), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    refuse_empty(&text)?;
    let mut client = connect(paths).await?;
    let text = message_text(text)?;
    refuse_empty(&text)?;
    // Caught from here on, so that no Ctrl-C kills chat-cli with the
    // message's fate untold.
    let mut interrupt = signal(SignalKind::interrupt()).context("catching Ctrl-C")?;
    client
        .send(&IpcRequest::Send {
            to,
            text,
            cancellable: true,
        })
        .await?;
    let id = match client.next().await? {
        IpcResponse::Accepted { id } => id,
        other => return Err(anyhow::anyhow!("unexpected answer from agentd: {other:?}").into()),
    };
    tokio::select! {
        resp = client.next() => {
            print(json, &resp?)?;
            Ok(())
        }
        _ = interrupt.recv() => interrupted(&mut client, json, &id).await,
    }
}

/// Ctrl-C during a send of message `id`: ask agentd to withdraw it, and say
/// what became of it.
async fn interrupted(client: &mut IpcClient, json: bool, id: &str) -> Result<(), Failure> {
    let answer = match client.send(&IpcRequest::Cancel).await {
        Ok(()) => tokio::time::timeout(CANCEL_WAIT, client.next()).await.ok(),
        Err(_) => None,
    };
    match answer {
        Some(Ok(IpcResponse::Cancelled { .. })) => Err(Failure::interrupted(
            "cancelled",
            id,
            format!("cancelled: the message (id {id}) was not sent and will not be"),
        )),
        // It finished just then: an ordinary answer.
        Some(Ok(resp @ IpcResponse::Sent(_))) => print(json, &resp).map_err(Into::into),
        Some(Err(e @ IpcClientError::Agent(_))) => Err(e.into()),
        _ => Err(Failure::interrupted(
            "interrupted",
            id,
            format!(
                "interrupted: the message (id {id}) may still be delivered; check with \
                 `chat-cli status` before sending again"
            ),
        )),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
