//! The hub flags every binary shares (`--revision`, `--token`), declared once and flattened into
//! each binary's flags under that binary's own help heading.

use corda_core::hub::Hub;

/// Where a hub model id is fetched from and with which credentials.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Hub revision of the model id(s): a branch, tag or commit sha.
    #[arg(long, value_name = "REV", default_value = "main")]
    pub revision: String,

    /// Hugging Face token for gated or private repos [default: HF_TOKEN, else the token file of
    /// `huggingface-cli login`].
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl HubArgs {
    /// The hub client: the environment's endpoint and cache, this token if given.
    pub fn hub(&self) -> Hub {
        Hub::from_env().with_token(self.token.clone())
    }

    /// Whether either flag differs from its default (a binary that only sometimes fetches
    /// refuses them when it does not).
    pub fn is_set(&self) -> bool {
        self.revision != "main" || self.token.is_some()
    }
}
