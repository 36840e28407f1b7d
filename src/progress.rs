//! Progress bars with rate and ETA on long loops; silent with `--quiet` or off a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub quiet: bool,
}

impl Progress {
    /// A bar over `len` items of `unit` (e.g. "img").
    pub fn bar(&self, len: usize, what: &str, unit: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::hidden());
        }
        let bar = ProgressBar::new(len as u64);
        let template =
            format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}");
        bar.set_style(
            ProgressStyle::with_template(&template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar
    }
}
