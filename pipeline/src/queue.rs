//! A queue bounded in bytes where the transport runtime meets compute threads: tasks
//! `send` (waiting while the queue is full), a plain thread `recv`s (blocking while it is
//! empty). A slow consumer therefore stops the task that reads the network, and HTTP/2
//! flow control stops the sender on the other side.

use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Permits count KiB so that limits past 4 GiB fit the semaphore's u32 requests.
const UNIT: usize = 1024;

pub struct Sender<T> {
    tx: mpsc::UnboundedSender<(T, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
    limit_units: u32,
}

pub struct Receiver<T> {
    rx: mpsc::UnboundedReceiver<(T, OwnedSemaphorePermit)>,
}

/// A queue holding at most `limit_bytes` (and always at least one item, however big).
pub fn bounded<T>(limit_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let limit_units = (limit_bytes.div_ceil(UNIT)).clamp(1, u32::MAX as usize >> 4) as u32;
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Sender {
            tx,
            room: Arc::new(Semaphore::new(limit_units as usize)),
            limit_units,
        },
        Receiver { rx },
    )
}

impl<T> Sender<T> {
    /// Waits for room for `bytes`, then queues `item`; `Err` gives it back when the
    /// receiver is gone.
    pub async fn send(&self, item: T, bytes: usize) -> Result<(), T> {
        let units = (bytes.div_ceil(UNIT) as u32).clamp(1, self.limit_units);
        let permit = match self.room.clone().acquire_many_owned(units).await {
            Ok(p) => p,
            Err(_) => return Err(item),
        };
        self.tx.send((item, permit)).map_err(|e| e.0 .0)
    }
}

impl<T> Receiver<T> {
    /// The next item (its room is freed), or `None` once every sender is gone and the
    /// queue is empty. Must not be called from inside the runtime.
    pub fn blocking_recv(&mut self) -> Option<T> {
        self.rx.blocking_recv().map(|(item, _permit)| item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = bounded::<usize>(10 * UNIT);
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s2 = sent.clone();
        let t = std::thread::spawn(move || {
            rt.block_on(async move {
                for i in 0..20 {
                    tx.send(i, 3 * UNIT).await.unwrap();
                    s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        });
        // three items of 3 KiB fit in 10 KiB; the fourth waits for the consumer
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sent.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 3);
        let got: Vec<usize> = std::iter::from_fn(|| rx.blocking_recv()).collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        t.join().unwrap();
    }
}
