//! The chat's two ends at the user: what they type and what is printed.
//!
//! On a terminal (stdin and stdout both), a line editor (rustyline) reads
//! each line on its own thread: the prompt, editing, the session's lines
//! again with the arrow keys. Lines to show go through rustyline's external
//! printer, which puts them above the prompt and redraws the half-typed
//! line below. That printer may block until the editor takes the line, so
//! it runs on a thread of its own too, never on the async side.
//!
//! ```text
//!   async chat ── ask(prompt, initial) ──► editor thread ── readline ──► Typed
//!              ◄──────────────── Typed ───┘
//!              ── line(text) ──► printer thread ── above the prompt
//! ```
//!
//! Without a terminal (a script's pipe) lines are read plainly from stdin,
//! no prompt is shown, what happens goes to stdout and notices to stderr.

use std::io::{BufRead, Write};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor, ExternalPrinter};
use tokio::sync::mpsc;

use crate::output::sanitize;

/// How many typed lines the arrow keys can bring back.
const HISTORY_LINES: usize = 500;

/// How long leaving waits for the last lines to be printed.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// What the user did at the prompt.
#[derive(Debug)]
pub enum Typed {
    /// A line, without its newline.
    Line(String),
    /// Ctrl-D on an empty line, or the end of stdin.
    Eof,
    /// Ctrl-C.
    Interrupted,
    /// Reading failed.
    Failed(String),
}

/// A request for the next line.
struct Ask {
    prompt: String,
    /// Text already in the line (one that could not be sent).
    initial: String,
}

/// Where lines to show go.
enum Out {
    /// Above the editor's prompt, through the printer thread.
    Editor {
        lines: Option<std_mpsc::Sender<String>>,
        done: std_mpsc::Receiver<()>,
    },
    /// stdout, notices on stderr.
    Plain,
}

/// The user's end of the chat.
pub struct Terminal {
    asks: std_mpsc::Sender<Ask>,
    typed: mpsc::Receiver<Typed>,
    out: Out,
    /// The terminal's settings at the start, put back at the end whatever
    /// happens (the editor restores them itself after each line; this
    /// covers leaving while it is reading one).
    _restore: Option<RestoreTerminal>,
}

impl Terminal {
    /// The line editor when stdin and stdout are a terminal, else plain
    /// lines.
    pub fn open(editor: bool) -> Result<Self> {
        let (asks, asks_rx) = std_mpsc::channel::<Ask>();
        let (typed_tx, typed) = mpsc::channel(16);
        if !editor {
            std::thread::Builder::new()
                .name("chat-stdin".into())
                .spawn(move || read_plain(&asks_rx, &typed_tx))
                .context("starting the input thread")?;
            return Ok(Self {
                asks,
                typed,
                out: Out::Plain,
                _restore: None,
            });
        }
        let restore = RestoreTerminal::save();
        let (ready_tx, ready) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("chat-editor".into())
            .spawn(move || edit_lines(&asks_rx, &typed_tx, &ready_tx))
            .context("starting the line editor")?;
        let printer = ready
            .recv()
            .map_err(|_| anyhow!("the line editor stopped at once"))?
            .map_err(|e| anyhow!("starting the line editor: {e}"))?;
        let (lines_tx, lines) = std_mpsc::channel::<String>();
        let (done_tx, done) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("chat-printer".into())
            .spawn(move || print_lines(printer, &lines, &done_tx))
            .context("starting the printer")?;
        Ok(Self {
            asks,
            typed,
            out: Out::Editor {
                lines: Some(lines_tx),
                done,
            },
            _restore: restore,
        })
    }

    /// Whether lines are typed in the line editor (else read from a pipe).
    pub fn is_editor(&self) -> bool {
        matches!(self.out, Out::Editor { .. })
    }

    /// Read the next line, starting with `initial` already typed.
    pub fn ask(&self, prompt: String, initial: String) {
        let _ = self.asks.send(Ask { prompt, initial });
    }

    /// What was typed at the last [`Terminal::ask`].
    pub async fn typed(&mut self) -> Typed {
        self.typed
            .recv()
            .await
            .unwrap_or(Typed::Failed("the input thread stopped".into()))
    }

    /// Show `text` (escaped for the terminal).
    pub fn line(&mut self, text: &str) {
        self.emit(text, false);
    }

    /// Show a notice: an error, or news about the connection (stderr when
    /// there is no terminal).
    pub fn notice(&mut self, text: &str) {
        self.emit(text, true);
    }

    fn emit(&mut self, text: &str, notice: bool) {
        let mut shown = sanitize(text);
        shown.push('\n');
        match &self.out {
            Out::Editor { lines: Some(l), .. } => {
                let _ = l.send(shown);
            }
            Out::Editor { lines: None, .. } => {}
            Out::Plain if notice => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(shown.as_bytes());
            }
            Out::Plain => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(shown.as_bytes());
                let _ = out.flush();
            }
        }
    }

    /// Print what is still queued (bounded: the printer may wait on the
    /// editor).
    pub fn close(&mut self) {
        if let Out::Editor { lines, done } = &mut self.out {
            lines.take();
            let _ = done.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// The plain input thread: one line per ask.
fn read_plain(asks: &std_mpsc::Receiver<Ask>, typed: &mpsc::Sender<Typed>) {
    let stdin = std::io::stdin();
    while asks.recv().is_ok() {
        let mut line = String::new();
        let t = match stdin.lock().read_line(&mut line) {
            Ok(0) => Typed::Eof,
            Ok(_) => Typed::Line(line.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => Typed::Failed(e.to_string()),
        };
        if typed.blocking_send(t).is_err() {
            return;
        }
    }
}

type Printer = Box<dyn ExternalPrinter + Send>;

/// The editor thread: makes the editor, hands its printer over, then reads
/// one line per ask.
fn edit_lines(
    asks: &std_mpsc::Receiver<Ask>,
    typed: &mpsc::Sender<Typed>,
    ready: &std_mpsc::Sender<Result<Printer, String>>,
) {
    let made = Config::builder()
        .auto_add_history(false)
        .max_history_size(HISTORY_LINES)
        .map(|c| c.build())
        .and_then(DefaultEditor::with_config)
        .and_then(|mut editor| {
            let printer = editor.create_external_printer()?;
            Ok((editor, printer))
        });
    let mut editor = match made {
        Ok((editor, printer)) => {
            let _ = ready.send(Ok(Box::new(printer)));
            editor
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    while let Ok(ask) = asks.recv() {
        let t = match editor.readline_with_initial(&ask.prompt, (&ask.initial, "")) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                Typed::Line(line)
            }
            Err(ReadlineError::Eof) => Typed::Eof,
            Err(ReadlineError::Interrupted) => Typed::Interrupted,
            Err(e) => Typed::Failed(e.to_string()),
        };
        if typed.blocking_send(t).is_err() {
            return;
        }
    }
}

/// The printer thread: each line above the prompt (or straight out when no
/// line is being edited).
fn print_lines(
    mut printer: Printer,
    lines: &std_mpsc::Receiver<String>,
    done: &std_mpsc::Sender<()>,
) {
    while let Ok(line) = lines.recv() {
        if printer.print(line.clone()).is_err() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }
    let _ = done.send(());
}

/// The terminal's settings when the chat started, put back on drop.
struct RestoreTerminal(rustix::termios::Termios);

impl RestoreTerminal {
    fn save() -> Option<Self> {
        rustix::termios::tcgetattr(std::io::stdin()).ok().map(Self)
    }
}

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}
