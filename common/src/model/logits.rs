//! Next-token logits where the model left them. On the CPU reading them is a copy; from a GPU it waits for the
//! queued work, which a browser cannot block on: there the caller awaits [`Logits::read_async`] and lets the event
//! loop run while the GPU computes.

use burn::tensor::{Tensor, TensorData};

use super::SessionError;

/// The logits of the next token: on the host, or still on the device (`[1, vocab]`).
#[derive(Debug)]
pub enum Logits {
    Host(Vec<f32>),
    Device(Tensor<2>),
}

impl From<Vec<f32>> for Logits {
    fn from(v: Vec<f32>) -> Self {
        Logits::Host(v)
    }
}

impl Logits {
    /// The logits, waiting for the device if they are still being computed (not in a browser: see
    /// [`read_async`](Self::read_async)).
    pub fn read(self) -> Result<Vec<f32>, SessionError> {
        match self {
            Logits::Host(v) => Ok(v),
            Logits::Device(t) => to_vec(Ok(t.into_data())),
        }
    }

    /// The logits, yielding while the device computes them.
    pub async fn read_async(self) -> Result<Vec<f32>, SessionError> {
        match self {
            Logits::Host(v) => Ok(v),
            Logits::Device(t) => to_vec(t.into_data_async().await.map_err(|e| e.to_string())),
        }
    }
}

fn to_vec(data: Result<TensorData, String>) -> Result<Vec<f32>, SessionError> {
    data.and_then(|d| d.try_into_vec::<f32>().map_err(|e| format!("{e:?}")))
        .map_err(SessionError::Device)
}
