//! Seeded initialisation. In a test binary of its own: the CPU backend has one process-wide
//! generator, which tests running in parallel would otherwise draw from in between.

use burn::prelude::*;
use conf_model::GptConfig;

#[test]
fn seeding_the_device_makes_initialisation_reproducible() {
    let device = Device::flex();
    let weights = |seed| {
        device.seed(seed);
        let m = GptConfig::new(11, 16, 32, 2, 4, 128).init_minigpt(&device);
        m.blocks[1]
            .mlp
            .proj
            .weight
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    assert_eq!(weights(5), weights(5));
    assert_ne!(weights(5), weights(6));
}
