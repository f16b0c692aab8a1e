//! Running one of the four services from this binary (`haishin-local service NAME`), so that the
//! local stack starts each as its own process running the production code, configured through
//! its environment exactly as Cloud Run configures it.

use clap::Parser;

/// The four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Service {
    Trigger,
    ListUploader,
    Sender,
    Completion,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Trigger => "trigger",
            Service::ListUploader => "list-uploader",
            Service::Sender => "sender",
            Service::Completion => "completion",
        }
    }
}

/// Runs a service until SIGTERM (or, for the completion job, for one pass), reading its
/// configuration from the environment.
pub async fn run(service: Service) -> anyhow::Result<()> {
    let name = [service.name()];
    let shutdown = haishin_shared::server::shutdown_signal();
    match service {
        Service::Trigger => {
            let app = haishin_trigger::Application::build(haishin_trigger::Config::parse_from(name)).await?;
            app.run_until_stopped(shutdown).await
        }
        Service::ListUploader => {
            let app =
                haishin_list_uploader::Application::build(haishin_list_uploader::Config::parse_from(name))
                    .await?;
            app.run_until_stopped(shutdown).await
        }
        Service::Sender => {
            let app = haishin_sender::Application::build(haishin_sender::Config::parse_from(name)).await?;
            app.run_until_stopped(shutdown).await
        }
        Service::Completion => {
            let job = haishin_completion::Job::build(haishin_completion::Config::parse_from(name)).await?;
            let report = job.run().await?;
            tracing::debug!(report = %serde_json::to_string(&report)?, "Completion run done.");
            Ok(())
        }
    }
}
