//! The one loop that carries a sync session's output out: each message, effect and event in the
//! order the session produced it. The daemon's engine, its sign-in, the relay's server and the
//! simulation all run this loop; each gives it its own [`Io`] (frames on a QUIC stream and a store,
//! or in-memory queues).
//!
//! Must not touch: what a session puts out when (that is `ferry_proto::session`), or what carrying
//! out an effect means (that is each `Io`: `engine::carry_out`, `relay::server::carry_out`).

use std::future::Future;
use std::ops::ControlFlow;

use ferry_proto::session::{
    DeviceEffect, DeviceEvent, DeviceSession, Output, RelayEffect, RelayEvent, RelaySession,
};
use ferry_proto::wire::Message;

/// A session the loop can drive: [`DeviceSession`] or [`RelaySession`].
pub trait Session {
    type Effect;
    type Event;

    fn poll_output(&mut self) -> Option<Output<Self::Effect, Self::Event>>;

    /// Sending failed: the connection is gone.
    fn connection_lost(&mut self, reason: String);
}

impl Session for DeviceSession {
    type Effect = DeviceEffect;
    type Event = DeviceEvent;

    fn poll_output(&mut self) -> Option<Output<DeviceEffect, DeviceEvent>> {
        DeviceSession::poll_output(self)
    }

    fn connection_lost(&mut self, reason: String) {
        DeviceSession::connection_lost(self, reason);
    }
}

impl Session for RelaySession {
    type Effect = RelayEffect;
    type Event = RelayEvent;

    fn poll_output(&mut self) -> Option<Output<RelayEffect, RelayEvent>> {
        RelaySession::poll_output(self)
    }

    fn connection_lost(&mut self, reason: String) {
        RelaySession::connection_lost(self, reason);
    }
}

/// What one side does with a session's output.
pub trait Io<S: Session> {
    type SendError: std::fmt::Display;

    /// Sends one message to the peer; done when the message is handed over, so a slow peer
    /// holds the loop (and with it the session's next reads) back.
    fn transmit(
        &mut self,
        message: Message,
    ) -> impl Future<Output = Result<(), Self::SendError>> + Send;

    /// Carries out one effect and gives the session its answer (or ends it) before returning:
    /// the session's next outputs may depend on it.
    fn carry_out(&mut self, session: &mut S, effect: S::Effect);

    /// Reports one event; `Break` stops the loop here, leaving the rest of the output untaken.
    fn report(&mut self, event: S::Event) -> ControlFlow<()>;
}

/// Takes the session's output, in order, until it has none (true if it had any) or `io` stops
/// at an event.
pub async fn drive<S: Session, I: Io<S>>(session: &mut S, io: &mut I) -> bool {
    let mut moved = false;
    while let Some(output) = session.poll_output() {
        moved = true;
        match output {
            Output::Transmit(message) => {
                if let Err(e) = io.transmit(message).await {
                    session.connection_lost(e.to_string());
                }
            }
            Output::Effect(effect) => io.carry_out(session, effect),
            Output::Event(event) => {
                if io.report(event).is_break() {
                    break;
                }
            }
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use ferry_proto::session::SessionConfig;
    use ferry_proto::wire::{Credential, UploadChange};

    /// Keeps what it was given, in order; answers batch loads from `queue`, refuses to send once
    /// `fail_sends` is set, and stops at `Authenticated` when `stop_when_in` is.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<String>,
        queue: Vec<UploadChange>,
        fail_sends: bool,
        stop_when_in: bool,
    }

    impl Io<DeviceSession> for Recorder {
        type SendError = &'static str;

        async fn transmit(&mut self, message: Message) -> Result<(), &'static str> {
            self.seen.push(format!("send {}", message.name()));
            if self.fail_sends {
                return Err("the stream is gone");
            }
            Ok(())
        }

        fn carry_out(&mut self, session: &mut DeviceSession, effect: DeviceEffect) {
            self.seen.push(match effect {
                DeviceEffect::LoadUploadBatch { .. } => {
                    session.upload(std::mem::take(&mut self.queue), 0);
                    "load".into()
                }
                other => format!("{other:?}"),
            });
        }

        fn report(&mut self, event: DeviceEvent) -> ControlFlow<()> {
            let authenticated = matches!(event, DeviceEvent::Authenticated { .. });
            self.seen.push(match event {
                DeviceEvent::Authenticated { .. } => "authenticated".into(),
                DeviceEvent::Idle { .. } => "idle".into(),
                DeviceEvent::Closed { error } => format!("closed: {error:?}"),
                other => format!("{other:?}"),
            });
            if authenticated && self.stop_when_in {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }

    /// A device session let in by hand: its next outputs are `Authenticated`, a batch to load
    /// and a `Download`.
    fn let_in() -> DeviceSession {
        let mut session = DeviceSession::new(
            SessionConfig::default(),
            SigningKey::from_bytes(&[3; 32]),
            "team".into(),
            Vec::new(),
            0,
            Credential::Key,
            None,
            0,
        );
        session.handle_message(
            Message::Challenge {
                version: ferry_proto::wire::PROTOCOL_VERSION,
                nonce: [0; 32],
                time_ms: 0,
            },
            0,
        );
        session.handle_message(
            Message::Welcome {
                time_ms: 0,
                head: 0,
                max_batch_changes: 10,
                max_frame_bytes: 1 << 20,
                expires_ms: 600_000,
                tokens: None,
            },
            0,
        );
        session
    }

    #[tokio::test]
    async fn outputs_are_taken_in_order_and_each_effect_answered_before_the_next() {
        let mut session = let_in();
        let mut io = Recorder {
            queue: vec![UploadChange {
                entry: 1,
                collection: "Customer".into(),
                record: "r1".into(),
                change: vec![1; 10],
            }],
            ..Recorder::default()
        };
        assert!(drive(&mut session, &mut io).await);
        // The load was answered when it was taken: the upload it made, and the next load, come
        // right after what the session had queued behind it (the download).
        assert_eq!(
            io.seen,
            [
                "send Hello",
                "send Authenticate",
                "authenticated",
                "load",
                "send Download",
                "send Upload",
                "load",
            ]
        );
        assert!(!drive(&mut session, &mut io).await, "nothing left");
    }

    #[tokio::test]
    async fn a_stop_at_an_event_leaves_the_rest_untaken() {
        let mut session = let_in();
        let mut io = Recorder {
            stop_when_in: true,
            ..Recorder::default()
        };
        drive(&mut session, &mut io).await;
        assert_eq!(io.seen.last().map(String::as_str), Some("authenticated"));
        assert!(matches!(
            session.poll_output(),
            Some(Output::Effect(DeviceEffect::LoadUploadBatch { .. }))
        ));
    }

    #[tokio::test]
    async fn a_failed_send_ends_the_session_as_a_lost_connection() {
        let mut session = let_in();
        let mut io = Recorder {
            fail_sends: true,
            ..Recorder::default()
        };
        drive(&mut session, &mut io).await;
        assert!(session.is_closed());
        assert_eq!(io.seen.first().map(String::as_str), Some("send Hello"));
        assert!(
            io.seen.last().is_some_and(
                |s| s.starts_with("closed: Some(ConnectionLost(\"the stream is gone\"")
            ),
            "{:?}",
            io.seen
        );
    }
}
