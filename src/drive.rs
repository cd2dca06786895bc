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
