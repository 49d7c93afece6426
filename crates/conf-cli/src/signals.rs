//! SIGINT and SIGTERM during training: the first asks the run to stop at the step in progress
//! (it saves a checkpoint there, and the command writes what it has, marked incomplete); a
//! second one ends the process at once.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conf_train::stop::{StopReason, StopRequest};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Routes SIGINT and SIGTERM to the returned request for the rest of the process.
pub fn install() -> std::io::Result<StopRequest> {
    let stop = StopRequest::default();
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let request = stop.clone();
    std::thread::spawn(move || {
        let mut pending = false;
        for signal in signals.forever() {
            if pending {
                eprintln!("\nsecond signal: stopping now, without saving");
                std::process::exit(128 + signal);
            }
            pending = true;
            eprintln!(
                "\n{}: finishing the current step and saving; a second one stops at once",
                StopReason::Signal(signal).describe()
            );
            request.request(StopReason::Signal(signal));
        }
    });
    keep_ctrl_c_a_signal();
    Ok(stop)
}

/// Burn's dashboard puts the terminal in raw mode, where Ctrl-C is a key press the dashboard
/// ignores rather than SIGINT. While training, this keeps the terminal's signal keys on (the
/// `ISIG` flag, the only part of raw mode it touches), so Ctrl-C stops the run as it does in
/// plain output. The dashboard restores the terminal's own settings when it closes.
fn keep_ctrl_c_a_signal() {
    static WATCHING: AtomicBool = AtomicBool::new(false);
    if !std::io::stdin().is_terminal() || WATCHING.swap(true, Ordering::SeqCst) {
        return;
    }
    std::thread::spawn(|| {
        loop {
            // SAFETY: tcgetattr/tcsetattr on the process's stdin with a zeroed, then filled,
            // termios; no memory is shared with anything else.
            unsafe {
                let mut termios: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(libc::STDIN_FILENO, &mut termios) == 0
                    && termios.c_lflag & libc::ISIG == 0
                {
                    termios.c_lflag |= libc::ISIG;
                    libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &termios);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}
