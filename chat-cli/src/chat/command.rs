//! What a typed chat line means: text to send, or one of the slash
//! commands. Parsing is pure (no agentd, no terminal), so every rule is
//! unit-tested here.
//!
//! A line starting with `/` is a command; `//text` sends `/text`. A line
//! `@user text` whispers to one user. Anything else is text for the
//! current target; a blank line is nothing.

use securechat_common::limits::validate_username;

/// How many messages `/history` shows without a number.
pub const HISTORY_DEFAULT: u32 = 20;

/// The most `/history N` shows.
pub const HISTORY_MAX: u32 = 1000;

/// One typed line, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A blank line: nothing to do (and nothing is sent).
    Nothing,
    /// Text for the current target (the room, or the user talked to).
    Say(String),
    /// `/to USER`: talk to USER from now on.
    To(String),
    /// `/whisper USER TEXT` or `@USER TEXT`: one message to USER; the
    /// target stays.
    Whisper {
        /// The recipient.
        to: String,
        /// The message.
        text: String,
    },
    /// `/all`: talk to the room from now on; `/all TEXT`: one message to
    /// everyone, the target stays.
    All(Option<String>),
    /// `/list`: who is online.
    List,
    /// `/history [N]`: the last N messages with the current target.
    History(u32),
    /// `/inbox`: unread messages.
    Inbox,
    /// `/help`: the commands.
    Help,
    /// `/quit`: leave.
    Quit,
}

/// Why a line was refused; the text says what to type instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// `/something` that is no command.
    #[error("unknown command /{0}; /help lists them (start a line with // to send a literal /)")]
    Unknown(String),
    /// A command with missing or extra words.
    #[error("usage: {0}")]
    Usage(&'static str),
    /// Not a possible username.
    #[error("{name:?} is not a username: {why}")]
    BadUser {
        /// What was typed.
        name: String,
        /// What is wrong with it.
        why: String,
    },
}

/// The first word of `s` and the rest after the whitespace that follows it.
fn split_word(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

fn user(name: &str) -> Result<String, ParseError> {
    validate_username(name).map_err(|why| ParseError::BadUser {
        name: name.into(),
        why,
    })?;
    Ok(name.into())
}

/// Understand one typed line.
pub fn parse(line: &str) -> Result<Command, ParseError> {
    if line.trim().is_empty() {
        return Ok(Command::Nothing);
    }
    if let Some(literal) = line.strip_prefix("//") {
        return Ok(Command::Say(format!("/{literal}")));
    }
    if let Some(command) = line.strip_prefix('/') {
        return slash(command);
    }
    if let Some(rest) = line.strip_prefix('@') {
        let (name, text) = split_word(rest);
        // `@` not followed by a name (an address, a smiley) is just text.
        if validate_username(name).is_ok() {
            if text.trim().is_empty() {
                return Err(ParseError::Usage("@user <text> (one message to user)"));
            }
            return Ok(Command::Whisper {
                to: name.into(),
                text: text.into(),
            });
        }
    }
    Ok(Command::Say(line.into()))
}

/// A line that started with `/` (given without it).
fn slash(command: &str) -> Result<Command, ParseError> {
    let (name, rest) = split_word(command);
    let rest_blank = rest.trim().is_empty();
    let no_args = |c: Command, usage: &'static str| {
        if rest_blank {
            Ok(c)
        } else {
            Err(ParseError::Usage(usage))
        }
    };
    match name {
        "to" => match split_word(rest) {
            (u, extra) if !u.is_empty() && extra.trim().is_empty() => Ok(Command::To(user(u)?)),
            _ => Err(ParseError::Usage("/to <user> (or /all for the room)")),
        },
        "whisper" => {
            let (u, text) = split_word(rest);
            if u.is_empty() || text.trim().is_empty() {
                return Err(ParseError::Usage("/whisper <user> <text>"));
            }
            Ok(Command::Whisper {
                to: user(u)?,
                text: text.into(),
            })
        }
        "all" => Ok(Command::All((!rest_blank).then(|| rest.into()))),
        "list" => no_args(Command::List, "/list"),
        "history" => {
            if rest_blank {
                return Ok(Command::History(HISTORY_DEFAULT));
            }
            match rest.trim().parse::<u32>() {
                Ok(n) if (1..=HISTORY_MAX).contains(&n) => Ok(Command::History(n)),
                _ => Err(ParseError::Usage(
                    "/history [n] (n from 1 to 1000, default 20)",
                )),
            }
        }
        "inbox" => no_args(Command::Inbox, "/inbox"),
        "help" => no_args(Command::Help, "/help"),
        "quit" => no_args(Command::Quit, "/quit"),
        other => Err(ParseError::Unknown(other.into())),
    }
}

/// What `/help` prints.
pub const HELP: &str = "\
Type a line and press Enter to send it to the current target (the prompt shows it).
  /to <user>              talk to <user> from now on
  /all                    talk to the room (everyone) from now on
  /all <text>             send one line to everyone
  /whisper <user> <text>  send one line to <user> only (also: @user <text>)
  /list                   who is online
  /history [n]            the last n messages here (default 20)
  /inbox                  unread messages
  /help                   this list
  /quit                   leave (Ctrl-D and Ctrl-C too)
A line starting with // sends a literal / (\"//shrug\" sends \"/shrug\").
Up and Down recall the lines typed in this session.";

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        parse(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn plain_lines_are_said_as_typed_and_blank_ones_are_nothing() {
        assert_eq!(ok("hello there"), Command::Say("hello there".into()));
        assert_eq!(ok("  spaced  "), Command::Say("  spaced  ".into()));
        assert_eq!(ok(""), Command::Nothing);
        assert_eq!(ok("   \t "), Command::Nothing);
        assert_eq!(ok("a / b"), Command::Say("a / b".into()));
    }

    #[test]
    fn a_double_slash_sends_a_literal_slash() {
        assert_eq!(ok("//shrug"), Command::Say("/shrug".into()));
        assert_eq!(ok("// hi"), Command::Say("/ hi".into()));
        assert_eq!(ok("///"), Command::Say("//".into()));
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!(ok("/to bob"), Command::To("bob".into()));
        assert_eq!(ok("/to   bob  "), Command::To("bob".into()));
        assert_eq!(
            ok("/whisper carol psst, over here"),
            Command::Whisper {
                to: "carol".into(),
                text: "psst, over here".into()
            }
        );
        assert_eq!(ok("/all"), Command::All(None));
        assert_eq!(ok("/all lunch?"), Command::All(Some("lunch?".into())));
        assert_eq!(ok("/list"), Command::List);
        assert_eq!(ok("/history"), Command::History(HISTORY_DEFAULT));
        assert_eq!(ok("/history 5"), Command::History(5));
        assert_eq!(ok("/inbox"), Command::Inbox);
        assert_eq!(ok("/help"), Command::Help);
        assert_eq!(ok("/quit"), Command::Quit);
        assert_eq!(ok("/quit "), Command::Quit);
    }

    #[test]
    fn at_user_whispers_but_other_ats_are_text() {
        assert_eq!(
            ok("@carol see you at 5"),
            Command::Whisper {
                to: "carol".into(),
                text: "see you at 5".into()
            }
        );
        assert_eq!(ok("@ everyone"), Command::Say("@ everyone".into()));
        assert_eq!(ok("@@bob hi"), Command::Say("@@bob hi".into()));
        assert_eq!(ok("@Bob hi"), Command::Say("@Bob hi".into()));
        assert_eq!(
            parse("@carol"),
            Err(ParseError::Usage("@user <text> (one message to user)"))
        );
        assert_eq!(
            parse("@carol   "),
            Err(ParseError::Usage("@user <text> (one message to user)"))
        );
    }

    #[test]
    fn unknown_commands_are_refused_with_the_way_out() {
        let e = parse("/shrug").unwrap_err();
        assert_eq!(e, ParseError::Unknown("shrug".into()));
        assert_eq!(
            e.to_string(),
            "unknown command /shrug; /help lists them (start a line with // to send a literal /)"
        );
        assert_eq!(parse("/").unwrap_err(), ParseError::Unknown(String::new()));
        assert_eq!(
            parse("/QUIT").unwrap_err(),
            ParseError::Unknown("QUIT".into())
        );
    }

    #[test]
    fn missing_or_extra_words_get_the_usage() {
        for line in [
            "/to",
            "/to bob carol",
            "/whisper",
            "/whisper bob",
            "/whisper bob  ",
        ] {
            assert!(
                matches!(parse(line), Err(ParseError::Usage(_))),
                "{line:?}: {:?}",
                parse(line)
            );
        }
        for line in ["/history 0", "/history x", "/history 1001", "/history -3"] {
            assert!(matches!(parse(line), Err(ParseError::Usage(_))), "{line}");
        }
        assert_eq!(parse("/list all"), Err(ParseError::Usage("/list")));
        assert!(matches!(parse("/to Bob"), Err(ParseError::BadUser { .. })));
        assert!(matches!(
            parse("/whisper x hi"),
            Err(ParseError::BadUser { .. })
        ));
    }
}
