//! Any body given to the request parser is accepted or rejected with a reason, never a panic;
//! an accepted request reads back the same after being stored as JSON.
#![no_main]

use haishin_shared::domain::DeliveryRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match DeliveryRequest::parse(body) {
        Ok(request) => {
            let stored = serde_json::to_vec(&request).expect("an accepted request serialises");
            let again = DeliveryRequest::parse(&stored).expect("a stored request parses again");
            assert_eq!(again, request);
        }
        Err(rejection) => assert!(!rejection.reason.is_empty(), "a rejection says why"),
    }
});
