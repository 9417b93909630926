//! The command line: every subcommand and flag, with the `--help` text
//! (the doc comments here are written for a terminal rather than rustdoc).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
///   chat-cli chat                  # the room: everyone; /help inside
#[derive(Debug, Parser)]
#[command(name = "chat-cli", version, verbatim_doc_comment)]
pub struct Cli {
    /// agentd's home directory [default: $XDG_DATA_HOME/securechat]; the same
    /// rule agentd uses finds its socket.
    #[arg(long, global = true, env = "SECURECHAT_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Show times in UTC instead of the local time zone (which comes from
    /// TZ, else /etc/localtime).
    #[arg(long, global = true)]
    pub utc: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    ///
    /// An empty message (or one of only spaces) is refused.
    Send {
        /// Recipient username.
        user: String,
        /// Message text; `-` reads it from stdin.
        text: String,
    },
    /// Show unread messages (sender, time, text) and mark them read.
    ///
    /// Messages count as read only once they have been printed: if chat-cli
    /// is interrupted, they show again next time. Control characters in
    /// messages are shown escaped (`\x1b`, `\r`, `\u{202e}`); `--json` gives
    /// the exact text.
    ///
    /// With --follow it keeps running: new messages are printed as they
    /// arrive (with --json, one message object per line) and marked read
    /// once printed, across agentd restarts, until Ctrl-C.
    ///
    ///   chat-cli inbox --from bob
    ///   chat-cli inbox --follow --json | my-bot
    #[command(verbatim_doc_comment)]
    Inbox {
        /// Show read messages too.
        #[arg(long)]
        all: bool,
        /// Only messages from this user.
        #[arg(long, value_name = "USER")]
        from: Option<String>,
        /// Keep printing new messages as they arrive, until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
    /// Show a conversation both ways, with where each sent message stands.
    ///
    /// Received messages show their sender; yours show `you → bob` and
    /// their state: sending, queued (the relay stored it), delivered (their
    /// agent has it), failed or expired (it waited on the relay too long).
    /// Without USER, the room: broadcasts sent and received. Oldest first;
    /// nothing is marked read.
    ///
    ///   chat-cli history bob
    ///   chat-cli history --limit 200
    ///   chat-cli history bob --json | jq '.entries[] | .text'
    #[command(verbatim_doc_comment)]
    History {
        /// The contact (omit for the room).
        user: Option<String>,
        /// How many of the newest messages to show.
        #[arg(long, default_value_t = 50, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
    },
    /// List your contacts: pinned keys, fingerprints, trust, last seen.
    Contacts,
    /// Follow agentd's events live: messages, receipts, expiries, presence.
    ///
    /// For scripts and bots. Runs until Ctrl-C; when agentd restarts it
    /// says so on stderr, reconnects and carries on after the last event
    /// printed, without losing or repeating one. With --json each event is
    /// exactly one JSON object per line (flushed at once), with its
    /// `cursor`: to resume later where a previous run stopped, pass the last
    /// cursor seen to --after. Events do not mark messages read.
    ///
    ///   chat-cli events
    ///   chat-cli events --json | jq -c 'select(.event == "message")'
    ///   chat-cli events --json --after 1041
    #[command(verbatim_doc_comment)]
    Events {
        /// Start after this cursor (an earlier run's last `cursor`) instead
        /// of with what happens from now on.
        #[arg(long, value_name = "CURSOR")]
        after: Option<u64>,
    },
    /// List messages held because their sender's key changed (see `trust`).
    Held,
    /// List users connected to the relay now.
    Online,
    /// Send a message to every registered user (sealed for each of them);
    /// those offline get it when they come back.
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
    /// Pin a contact's key after checking its fingerprint with them.
    ///
    /// Only a key with exactly this fingerprint is pinned: if the relay's
    /// directory serves another one, nothing changes. Without FINGERPRINT
    /// (on a terminal) the directory's fingerprint is shown and you are
    /// asked to confirm it. Held messages signed by that key move to the
    /// inbox; others stay held.
    ///
    ///   chat-cli fingerprint bob        # compare with what bob reads out
    ///   chat-cli trust bob "1a2b 3c4d …"
    #[command(verbatim_doc_comment)]
    Trust {
        /// The contact.
        user: String,
        /// The fingerprint you checked with them (64 hex digits; spaces,
        /// colons and a `sha256:` prefix are ignored).
        fingerprint: Option<String>,
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
    /// Chat interactively, in the room (everyone) or with one user.
    ///
    /// Each line you type goes to the current target, which the prompt
    /// shows (`[room]> ` or `[bob]> `). Messages, delivery receipts and
    /// who comes and goes appear as they arrive, above the line you are
    /// typing; Up and Down bring back earlier lines. Opening a conversation
    /// shows its last messages.
    ///
    ///   /to <user>              talk to <user> from now on
    ///   /all                    talk to the room from now on
    ///   /all <text>             send one line to everyone
    ///   /whisper <user> <text>  one line to <user> only (also: @user <text>)
    ///   /list                   who is online
    ///   /history [n]            the last n messages here (default 20)
    ///   /inbox                  unread messages
    ///   /help                   the commands
    ///   /quit                   leave (Ctrl-D and Ctrl-C too)
    ///
    /// A line starting with // sends a literal / ("//shrug" sends "/shrug").
    /// If agentd goes away, chat says so, reconnects by itself and puts
    /// an unsent line back at the prompt. Without a terminal (a pipe),
    /// lines are read one by one and sent, with no prompt.
    ///
    ///   chat-cli chat                  # the room
    ///   chat-cli chat bob              # with bob
    ///   echo "build is green" | chat-cli chat
    #[command(verbatim_doc_comment)]
    Chat {
        /// The user to talk to (omit for the room); refused if the relay
        /// has no such user.
        user: Option<String>,
    },
    /// Check agentd, the relay, its certificate, the clock, file modes and
    /// the key; each problem comes with its fix. Exits non-zero on a FAIL.
    Doctor,
    /// Print a shell completion script for bash, zsh or fish.
    ///
    ///   chat-cli completions bash > ~/.local/share/bash-completion/completions/chat-cli
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `chat-cli man | man -l -`).
    Man,
}
