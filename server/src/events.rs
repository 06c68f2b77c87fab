//! The server-wide session event bus: what happened to which session, for live lists.
//!
//! The session layer publishes a typed [`Event`] whenever something a list of sessions shows
//! changes (created, status, activity, an approval waiting or settled, a turn ended, deleted);
//! `GET /events` and the notifier ([`crate::notifier`]) subscribe. Every event carries the
//! session's summary as it was when the event was published, so a subscriber keeps a correct
//! list by replacing rows, never by patching them.
//!
//! Events are numbered from 1 within one run of the server ([`EventBus::epoch`] tells runs
//! apart). A bounded ring of recent events lets a subscriber that was away resume where it
//! left off; one that was away too long is told so ([`Since::Gap`]) and starts again from a
//! snapshot. Delivery to live subscribers is a bounded broadcast: a subscriber that falls
//! more than the ring's size behind gets `Lagged` and must start again from a snapshot too. A
//! publisher never waits for a subscriber.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

pub(crate) use crate::wire::{Event, EventKind};

/// Where a resumed subscription starts.
#[derive(Debug)]
pub(crate) enum Since {
    /// Every event after the one asked for, still retained, in order; live events follow on
    /// the receiver without a gap or a duplicate.
    Replay(Vec<Arc<Event>>),
    /// Events after the one asked for are no longer retained (or it is from another run of
    /// the server): the subscriber must start again from a snapshot. Live events follow.
    Gap,
}

/// The bus. Cheap to clone; every clone publishes to the same subscribers.
#[derive(Debug, Clone)]
pub(crate) struct EventBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    epoch: String,
    /// One permit per open stream of events (`limits.max_event_streams`).
    streams: Arc<Semaphore>,
    tx: broadcast::Sender<Arc<Event>>,
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// The newest event's number (0: none yet).
    last: u64,
    events: VecDeque<Arc<Event>>,
    capacity: usize,
}

impl EventBus {
    /// A bus that retains the last `capacity` events for resuming subscribers (which is also
    /// how far a live subscriber may fall behind before it is told it lagged) and admits at
    /// most `max_streams` streams at once.
    pub(crate) fn new(capacity: usize, max_streams: usize) -> Self {
        let capacity = capacity.max(1);
        // Any value that differs between runs will do; the time is the fallback.
        let epoch = crate::keeper::id::random_hex(4)
            .unwrap_or_else(|_| format!("{:08x}", crate::clock::now_ms() as u32));
        Self {
            inner: Arc::new(Inner {
                epoch,
                streams: Arc::new(Semaphore::new(max_streams.min(Semaphore::MAX_PERMITS))),
                tx: broadcast::channel(capacity).0,
                ring: Mutex::new(Ring {
                    last: 0,
                    events: VecDeque::with_capacity(capacity.min(1024)),
                    capacity,
                }),
            }),
        }
    }

    /// A place for one more stream of events, held until the stream ends; `None` when
    /// `limits.max_event_streams` are open.
    pub(crate) fn admit_stream(&self) -> Option<OwnedSemaphorePermit> {
        self.inner.streams.clone().try_acquire_owned().ok()
    }

    /// Names this run of the server: event numbers from another run mean nothing here.
    pub(crate) fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.inner.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes an event about session `session_id` of `instance_id`. Never waits.
    pub(crate) fn publish(&self, session_id: &str, instance_id: &str, kind: EventKind) {
        let mut ring = self.ring();
        ring.last += 1;
        let event = Arc::new(Event {
            seq: ring.last,
            at: crate::clock::now_ms(),
            session_id: session_id.to_owned(),
            instance_id: instance_id.to_owned(),
            kind,
        });
        tracing::trace!(
            seq = event.seq,
            session = session_id,
            kind = event.kind.name(),
            "event"
        );
        if ring.events.len() == ring.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Sent under the ring's lock, so the order on the channel is the numbering's.
        let _ = self.inner.tx.send(event);
    }

    /// Live events from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.tx.subscribe()
    }

    /// The newest event's number, and live events after it: what a subscriber that starts
    /// from a snapshot taken now needs.
    pub(crate) fn subscribe_now(&self) -> (u64, broadcast::Receiver<Arc<Event>>) {
        let ring = self.ring();
        (ring.last, self.inner.tx.subscribe())
    }

    /// Resumes after event `after` of run `epoch`: the retained events after it, then live
    /// ones (see [`Since`]).
    pub(crate) fn subscribe_since(
        &self,
        epoch: &str,
        after: u64,
    ) -> (Since, broadcast::Receiver<Arc<Event>>) {
        let ring = self.ring();
        let rx = self.inner.tx.subscribe();
        let oldest = ring.events.front().map_or(ring.last + 1, |e| e.seq);
        let since = if epoch != self.inner.epoch || after > ring.last || after + 1 < oldest {
            Since::Gap
        } else {
            Since::Replay(
                ring.events
                    .iter()
                    .filter(|e| e.seq > after)
                    .cloned()
                    .collect(),
            )
        };
        (since, rx)
    }

    /// The newest event's number (0: none yet).
    pub(crate) fn last_seq(&self) -> u64 {
        self.ring().last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deleted(bus: &EventBus, id: &str) {
        bus.publish(id, "inst", EventKind::SessionDeleted {});
    }

    #[tokio::test]
    async fn subscribers_get_events_in_order() {
        let bus = EventBus::new(8, 8);
        let mut rx = bus.subscribe();
        deleted(&bus, "a");
        deleted(&bus, "b");
        let first = rx.recv().await.expect("first");
        let second = rx.recv().await.expect("second");
        assert_eq!((first.seq, first.session_id.as_str()), (1, "a"));
        assert_eq!((second.seq, second.session_id.as_str()), (2, "b"));
        let json = serde_json::to_value(&*first).expect("json");
        assert_eq!(json["type"], "session_deleted");
        assert_eq!(json["sessionId"], "a");
        assert_eq!(json["instanceId"], "inst");
    }

    #[tokio::test]
    async fn resume_replays_what_is_retained_then_live_without_duplicates() {
        let bus = EventBus::new(3, 8);
        for id in ["a", "b", "c", "d"] {
            deleted(&bus, id);
        }
        let epoch = bus.epoch().to_owned();
        // 1 was pushed out of the ring (capacity 3): resuming after 0 has a gap.
        assert!(matches!(bus.subscribe_since(&epoch, 0).0, Since::Gap));
        let (since, mut rx) = bus.subscribe_since(&epoch, 2);
        let Since::Replay(events) = since else {
            panic!("expected a replay");
        };
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        deleted(&bus, "e");
        assert_eq!(rx.recv().await.expect("live").seq, 5);
        // Up to date: nothing to replay.
        assert!(matches!(bus.subscribe_since(&epoch, 5).0, Since::Replay(e) if e.is_empty()));
        // From the future, or from another run: start again.
        assert!(matches!(bus.subscribe_since(&epoch, 9).0, Since::Gap));
        assert!(matches!(bus.subscribe_since("other", 4).0, Since::Gap));
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_it_lagged_and_publishers_never_wait() {
        let bus = EventBus::new(2, 8);
        let mut rx = bus.subscribe();
        for i in 0..5 {
            deleted(&bus, &i.to_string());
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        assert_eq!(bus.last_seq(), 5);
    }
}
