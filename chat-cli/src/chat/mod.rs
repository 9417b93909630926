//! `chat-cli chat [USER]`: an interactive conversation, in the room (every
//! registered user) or with one user.
//!
//! ```text
//!            ┌──────────── Terminal (command.rs parses each line) ───────┐
//!  typed ───►│ /to /whisper @user /all /list /history /inbox /help /quit │
//!            └─────────────┬─────────────────────────────────────────────┘
//!                          │ requests (Send, Broadcast, History, Online, …)
//!   Chat ── IpcClient ─────┘ on one connection
//!        ◄─ Feed (events: messages, receipts, expiries, presence) on another,
//!           each shown message marked read on it
//! ```
//!
//! On start it checks the user exists, shows the last messages, then
//! follows agentd's events from that moment. When agentd goes away (its
//! events connection breaks, or a request fails on the socket) the chat says
//! so at once and the feed reconnects every second, resuming after the last
//! event shown; a line that could not be sent is put back at the prompt (or,
//! from a pipe, sent once agentd is back).

mod command;
mod terminal;

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;

use anyhow::{anyhow, Context};
use securechat_client::ipc::{IpcClient, IpcClientError};
use securechat_client::Paths;
use securechat_common::ipc::{
    Event, EventRecord, HistoryEntry, InboxMessage, IpcError, IpcErrorKind, IpcRequest, IpcResponse,
};
use securechat_common::protocol::ErrorCode;

use crate::failure::Failure;
use crate::feed::{Feed, FeedItem};
use crate::link;
use crate::render::{self, Stamp};
use crate::when;
use command::{Command, HELP};
use terminal::{Terminal, Typed};

/// How many messages opening a conversation shows.
const OPENING_HISTORY: u32 = 10;

/// How much of a message a receipt quotes.
const QUOTE_CHARS: usize = 40;

/// Whom plain lines go to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// Everyone (broadcasts).
    Room,
    /// One user.
    User(String),
}

impl Target {
    fn prompt(&self) -> String {
        match self {
            Target::Room => "[room]> ".into(),
            Target::User(u) => format!("[{u}]> "),
        }
    }

    /// The conversation's name for `History`.
    fn with(&self) -> Option<String> {
        match self {
            Target::Room => None,
            Target::User(u) => Some(u.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Room => "the room (everyone)".into(),
            Target::User(u) => u.clone(),
        }
    }
}

/// Why a request to agentd did not get an answer.
enum AgentError {
    /// agentd is not there (not running, restarting, hung up).
    Gone,
    /// agentd refused.
    Refused(IpcError),
}

/// Why a user cannot be talked to.
enum UserProblem {
    /// The relay has no such user.
    Unknown(IpcError),
    /// Nobody could say (agentd offline and no pinned key, or an error).
    CannotCheck(String),
    /// agentd is not there.
    Gone,
}

/// What to do after a typed line.
enum Next {
    /// Ask for the next line, with this text already typed.
    Prompt(String),
    /// agentd is away: the line waits for it (pipes only; on a terminal it
    /// goes back to the prompt).
    Wait(String),
    /// Leave.
    Quit,
}

/// `chat-cli chat [USER]`.
pub async fn run(paths: &Paths, user: Option<String>) -> Result<(), Failure> {
    let mut client = link::connect(paths).await?;
    let me = match client.request(&IpcRequest::Status).await? {
        IpcResponse::Status(s) => s.username,
        other => return Err(anyhow!("unexpected answer from agentd: {other:?}").into()),
    };
    let Some(me) = me else {
        return Err(Failure::refuse(
            IpcErrorKind::NotRegistered,
            "this agentd has no account yet: run `chat-cli register <user> --email <addr>` \
             (or `chat-cli login <user>`) first",
        ));
    };
    let target = match user {
        None => Target::Room,
        Some(u) => {
            if let Err(why) = securechat_common::limits::validate_username(&u) {
                return Err(Failure::refuse(IpcErrorKind::InvalidInput, why));
            }
            match check_user(&mut client, &u).await {
                Ok(()) => Target::User(u),
                Err(UserProblem::Unknown(e)) => return Err(Failure::agent(e)),
                Err(UserProblem::CannotCheck(why)) => {
                    return Err(Failure::refuse(IpcErrorKind::RelayUnavailable, why))
                }
                Err(UserProblem::Gone) => {
                    return Err(anyhow!("agentd went away while checking {u}").into())
                }
            }
        }
    };
    // The feed first: whatever arrives while the history is read shows
    // (once: ids already shown are skipped).
    let (feed, _head) = Feed::open(paths, None).await?;
    let editor = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let term = Terminal::open(editor)?;
    let mut chat = Chat {
        paths: paths.clone(),
        me,
        target,
        client: Some(client),
        feed,
        feed_up: true,
        away: false,
        sent: HashMap::new(),
        shown: HashSet::new(),
        term,
    };
    let result = chat.session().await;
    chat.term.close();
    result
}

/// Ask agentd whether `user` exists: a pinned key, or the relay's
/// directory, says so.
async fn check_user(client: &mut IpcClient, user: &str) -> Result<(), UserProblem> {
    let req = IpcRequest::Fingerprint {
        user: Some(user.into()),
    };
    match client.request(&req).await {
        Ok(IpcResponse::Fingerprint(f)) if f.pinned.is_some() || f.directory.is_some() => Ok(()),
        Ok(IpcResponse::Fingerprint(_)) => Err(UserProblem::CannotCheck(format!(
            "cannot check that {user} exists: agentd cannot reach the relay now and has no key \
             pinned for {user}; try again when `chat-cli status` says connected"
        ))),
        Ok(other) => Err(UserProblem::CannotCheck(format!(
            "unexpected answer from agentd: {other:?}"
        ))),
        Err(IpcClientError::Agent(e)) if e.relay_code == Some(ErrorCode::UnknownUser) => {
            let mut e = e;
            e.message = format!(
                "there is no user {user} on the relay; check the name (`chat-cli contacts` \
                 lists the people you have talked to)"
            );
            Err(UserProblem::Unknown(e))
        }
        Err(IpcClientError::Agent(e)) => Err(UserProblem::CannotCheck(format!(
            "cannot check that {user} exists: {}",
            e.message
        ))),
        Err(_) => Err(UserProblem::Gone),
    }
}

/// One chat session.
struct Chat {
    paths: Paths,
    me: String,
    target: Target,
    /// The request connection; `None` after agentd went away, made again
    /// on the next request once the feed is back.
    client: Option<IpcClient>,
    feed: Feed,
    /// The feed's connection works.
    feed_up: bool,
    /// The user was told agentd went away (and not yet that it is back).
    away: bool,
    /// The text of what was sent in this session, by message id, to quote
    /// in receipts.
    sent: HashMap<String, String>,
    /// Ids of the messages shown, so that none shows twice.
    shown: HashSet<String>,
    term: Terminal,
}

impl Chat {
    async fn session(&mut self) -> Result<(), Failure> {
        use tokio::signal::unix::{signal, SignalKind};
        // Ctrl-C while the editor is not reading a line (it reads Ctrl-C
        // itself) leaves as cleanly.
        let mut interrupt = signal(SignalKind::interrupt()).context("catching Ctrl-C")?;
        let how = if self.term.is_editor() {
            "; /help lists the commands, Ctrl-D leaves"
        } else {
            ""
        };
        self.term.notice(&format!(
            "chatting with {} as {}{how}",
            self.target.describe(),
            self.me
        ));
        self.show_recent(OPENING_HISTORY, true).await;
        // A line from a pipe that waits for agentd to come back.
        let mut waiting: Option<String> = None;
        self.term.ask(self.target.prompt(), String::new());
        loop {
            let next = tokio::select! {
                typed = self.term.typed() => match typed {
                    Typed::Line(line) => self.handle(&line).await,
                    Typed::Eof | Typed::Interrupted => Next::Quit,
                    Typed::Failed(e) => return Err(anyhow!("reading the terminal: {e}").into()),
                },
                item = self.feed.next() => {
                    let Some(item) = item else {
                        return Err(anyhow!("the events stream stopped").into());
                    };
                    let back = matches!(item, FeedItem::Back);
                    self.on_feed(item);
                    match waiting.take() {
                        Some(line) if back => self.handle(&line).await,
                        Some(line) => Next::Wait(line),
                        None => continue,
                    }
                }
                _ = interrupt.recv() => Next::Quit,
            };
            match next {
                Next::Prompt(initial) => self.term.ask(self.target.prompt(), initial),
                Next::Wait(line) => waiting = Some(line),
                Next::Quit => return Ok(()),
            }
        }
    }

    fn notice(&mut self, text: &str) {
        self.term.notice(text);
    }

    fn went_away(&mut self) {
        if !self.away {
            self.away = true;
            self.notice("agentd went away; reconnecting…");
        }
    }

    fn came_back(&mut self) {
        if self.away {
            self.away = false;
            self.notice("agentd is back");
        }
    }

    /// The request connection, made again if agentd went away and the feed
    /// says it is back.
    async fn client(&mut self) -> Result<&mut IpcClient, AgentError> {
        if self.client.is_none() {
            if !self.feed_up {
                self.went_away();
                return Err(AgentError::Gone);
            }
            match link::reconnect(&self.paths).await {
                Ok(c) => {
                    self.client = Some(c);
                    self.came_back();
                }
                Err(_) => {
                    self.went_away();
                    return Err(AgentError::Gone);
                }
            }
        }
        self.client.as_mut().ok_or(AgentError::Gone)
    }

    fn failed(&mut self, e: IpcClientError) -> AgentError {
        match e {
            IpcClientError::Agent(e) => AgentError::Refused(e),
            _ => {
                self.client = None;
                self.went_away();
                AgentError::Gone
            }
        }
    }

    /// One request, one answer.
    async fn request(&mut self, req: &IpcRequest) -> Result<IpcResponse, AgentError> {
        let answer = self.client().await?.request(req).await;
        answer.map_err(|e| self.failed(e))
    }

    /// A streamed answer: every line up to `End`.
    async fn request_list(&mut self, req: &IpcRequest) -> Result<Vec<IpcResponse>, AgentError> {
        let client = self.client().await?;
        let mut items = Vec::new();
        let read = async {
            client.send(req).await?;
            loop {
                match client.next().await? {
                    IpcResponse::End { .. } => return Ok(()),
                    item => items.push(item),
                }
            }
        };
        match read.await {
            Ok(()) => Ok(items),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// What a failed request means for the typed line.
    fn not_done(&mut self, e: AgentError, what: &str, line: &str) -> Next {
        match e {
            AgentError::Refused(e) => {
                self.notice(&format!("{what}: {}", e.message));
                Next::Prompt(String::new())
            }
            AgentError::Gone if self.term.is_editor() => {
                self.notice(&format!(
                    "{what}: agentd is away; your line is back at the prompt (Enter tries again)"
                ));
                Next::Prompt(line.to_string())
            }
            AgentError::Gone => {
                self.notice(&format!(
                    "{what} yet: agentd is away; it goes once agentd is back"
                ));
                Next::Wait(line.to_string())
            }
        }
    }

    async fn handle(&mut self, line: &str) -> Next {
        let command = match command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                self.notice(&e.to_string());
                return Next::Prompt(String::new());
            }
        };
        match command {
            Command::Nothing => Next::Prompt(String::new()),
            Command::Say(text) => match self.target.clone() {
                Target::Room => self.broadcast(text, line).await,
                Target::User(u) => self.send(u, text, line).await,
            },
            Command::Whisper { to, text } => self.send(to, text, line).await,
            Command::All(Some(text)) => self.broadcast(text, line).await,
            Command::All(None) => {
                self.target = Target::Room;
                self.notice("now talking to the room (everyone)");
                self.show_recent(OPENING_HISTORY, true).await;
                Next::Prompt(String::new())
            }
            Command::To(user) => self.switch_to(user, line).await,
            Command::List => self.list(line).await,
            Command::History(n) => {
                if self.show_recent(n, false).await {
                    Next::Prompt(String::new())
                } else {
                    Next::Prompt(line.to_string())
                }
            }
            Command::Inbox => self.inbox(line).await,
            Command::Help => {
                for l in HELP.lines() {
                    self.notice(l);
                }
                Next::Prompt(String::new())
            }
            Command::Quit => Next::Quit,
        }
    }

    fn now(&self) -> Stamp {
        Stamp::Clock {
            now_ms: when::now_ms(),
        }
    }

    async fn send(&mut self, to: String, text: String, line: &str) -> Next {
        if text.trim().is_empty() {
            self.notice("not sent: the message is empty");
            return Next::Prompt(String::new());
        }
        let req = IpcRequest::Send {
            to: to.clone(),
            text: text.clone(),
            cancellable: false,
        };
        match self.request(&req).await {
            Ok(IpcResponse::Sent(info)) => {
                let stamp = self.now().show(when::now_ms());
                let state = if info.duplicate {
                    "queued (already stored)"
                } else {
                    "queued"
                };
                self.term.line(&format!(
                    "{stamp} you → {to}: {}  [{state}]",
                    text.replace('\n', "\n    ")
                ));
                self.sent.insert(info.id, text);
                Next::Prompt(String::new())
            }
            Ok(other) => {
                self.notice(&format!("unexpected answer from agentd: {other:?}"));
                Next::Prompt(String::new())
            }
            Err(e) => self.not_done(e, "not sent", line),
        }
    }

    async fn broadcast(&mut self, text: String, line: &str) -> Next {
        if text.trim().is_empty() {
            self.notice("not sent: the message is empty");
            return Next::Prompt(String::new());
        }
        let req = IpcRequest::Broadcast { text: text.clone() };
        match self.request(&req).await {
            Ok(IpcResponse::Broadcast { sent, failed }) => {
                let stamp = self.now().show(when::now_ms());
                let state = match sent.len() {
                    0 => "nobody else is registered".to_string(),
                    1 => "queued for 1 user".to_string(),
                    n => format!("queued for {n} users"),
                };
                self.term.line(&format!(
                    "{stamp} you → everyone: {}  [{state}]",
                    text.replace('\n', "\n    ")
                ));
                for s in sent {
                    self.sent.insert(s.id, text.clone());
                }
                for f in failed {
                    self.notice(&format!("not sent to {}: {}", f.to, f.error.message));
                }
                Next::Prompt(String::new())
            }
            Ok(other) => {
                self.notice(&format!("unexpected answer from agentd: {other:?}"));
                Next::Prompt(String::new())
            }
            Err(e) => self.not_done(e, "not sent", line),
        }
    }

    async fn switch_to(&mut self, user: String, line: &str) -> Next {
        let checked = match self.client().await {
            Ok(client) => check_user(client, &user).await,
            Err(_) => Err(UserProblem::Gone),
        };
        match checked {
            Ok(()) => {
                self.target = Target::User(user.clone());
                self.notice(&format!("now talking to {user}"));
                self.show_recent(OPENING_HISTORY, true).await;
                Next::Prompt(String::new())
            }
            Err(UserProblem::Unknown(e)) => {
                self.notice(&e.message);
                Next::Prompt(String::new())
            }
            Err(UserProblem::CannotCheck(why)) => {
                self.notice(&why);
                Next::Prompt(String::new())
            }
            Err(UserProblem::Gone) => {
                self.client = None;
                self.went_away();
                self.not_done(AgentError::Gone, "cannot switch", line)
            }
        }
    }

    async fn list(&mut self, line: &str) -> Next {
        match self.request(&IpcRequest::Online).await {
            Ok(IpcResponse::Online { users }) => {
                let names: Vec<String> = users
                    .iter()
                    .map(|u| {
                        if *u == self.me {
                            format!("{u} (you)")
                        } else {
                            u.clone()
                        }
                    })
                    .collect();
                let text = if names.is_empty() {
                    "nobody online (agentd may not be connected to the relay)".into()
                } else {
                    format!("{} online: {}", names.len(), names.join(", "))
                };
                self.notice(&text);
                Next::Prompt(String::new())
            }
            Ok(other) => {
                self.notice(&format!("unexpected answer from agentd: {other:?}"));
                Next::Prompt(String::new())
            }
            Err(e) => self.not_done(e, "cannot list", line),
        }
    }

    /// Show the last `n` messages with the current target; unread ones
    /// count as read once shown. False when agentd could not be asked.
    async fn show_recent(&mut self, n: u32, opening: bool) -> bool {
        let req = IpcRequest::History {
            with: self.target.with(),
            limit: n,
        };
        let items = match self.request_list(&req).await {
            Ok(items) => items,
            Err(AgentError::Refused(e)) => {
                self.notice(&format!("cannot show the history: {}", e.message));
                return true;
            }
            Err(AgentError::Gone) => return false,
        };
        let stamp = self.now();
        let mut read = Vec::new();
        let mut count = 0;
        for item in items {
            let IpcResponse::Entry(entry) = item else {
                continue;
            };
            count += 1;
            let text = match &entry {
                HistoryEntry::In(m) => {
                    self.shown.insert(m.id.clone());
                    if !m.read {
                        read.push(m.id.clone());
                    }
                    render::incoming(m, stamp, self.label(m))
                }
                HistoryEntry::Out(_) => render::entry(&entry, stamp),
            };
            self.term.line(&text);
        }
        self.feed.mark_read(read);
        if count == 0 && !opening {
            self.notice(&format!("no messages with {} yet", self.target.describe()));
        }
        true
    }

    async fn inbox(&mut self, line: &str) -> Next {
        let req = IpcRequest::Inbox {
            all: false,
            from: None,
        };
        let items = match self.request_list(&req).await {
            Ok(items) => items,
            Err(e) => return self.not_done(e, "cannot read the inbox", line),
        };
        let stamp = self.now();
        let mut ids = Vec::new();
        for item in items {
            if let IpcResponse::Message(m) = item {
                self.term.line(&render::incoming(&m, stamp, self.label(&m)));
                self.shown.insert(m.id.clone());
                ids.push(m.id);
            }
        }
        if ids.is_empty() {
            self.notice("no unread messages");
        }
        self.feed.mark_read(ids);
        Next::Prompt(String::new())
    }

    /// How a received message is marked, seen from the current target:
    /// nothing for the conversation on screen, `(private)` for a direct
    /// message from elsewhere, `(room)` for a broadcast while talking to
    /// one user.
    fn label(&self, m: &InboxMessage) -> &'static str {
        match (&self.target, m.broadcast) {
            (Target::Room, true) => "",
            (Target::Room, false) => "(private) ",
            (Target::User(u), false) if *u == m.from => "",
            (Target::User(_), false) => "(private) ",
            (Target::User(_), true) => "(room) ",
        }
    }

    fn on_feed(&mut self, item: FeedItem) {
        match item {
            FeedItem::Event(rec) => self.on_event(rec),
            FeedItem::Lost(_) => {
                self.feed_up = false;
                self.went_away();
            }
            FeedItem::Refused(why) => {
                self.notice(&format!(
                    "agentd answers but refuses the events: {why}; still trying"
                ));
            }
            FeedItem::Back => {
                self.feed_up = true;
                self.came_back();
            }
        }
    }

    fn on_event(&mut self, rec: EventRecord) {
        match rec.event {
            Event::Message(m) => {
                if !self.shown.insert(m.id.clone()) {
                    return;
                }
                let line = render::incoming(&m, self.now(), self.label(&m));
                self.term.line(&line);
                self.feed.mark_read(vec![m.id]);
            }
            Event::Receipt { id, from, .. } => {
                let what = self.quote(&id);
                self.term.line(&format!("✓ delivered to {from}: {what}"));
            }
            Event::Expired { id, to, .. } => {
                let what = self.quote(&id);
                self.term.line(&format!(
                    "✗ not delivered to {to}: {what} waited on the relay too long and expired"
                ));
            }
            Event::Presence { user, online, .. } => {
                let relevant = match &self.target {
                    Target::Room => true,
                    Target::User(u) => *u == user,
                };
                if user != self.me && relevant {
                    let how = if online { "is online" } else { "went offline" };
                    self.term.line(&format!("* {user} {how}"));
                }
            }
            _ => {}
        }
    }

    /// A sent message as a receipt names it: its text, quoted short, when
    /// it was sent in this session; else its id.
    fn quote(&self, id: &str) -> String {
        match self.sent.get(id) {
            Some(text) => format!("“{}”", render::short(text, QUOTE_CHARS)),
            None => format!("message {}", render::short_id(id)),
        }
    }
}
