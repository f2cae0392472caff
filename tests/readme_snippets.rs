//! The snippets of the original Quorum Quest client README, unchanged, run
//! against a TestServer listening on the address they name (localhost:5050).
//! Each module holds one snippet as that README has it; only a wrapping function signature (and a
//! trailing `Ok(client)`) is added so that it can be called and checked, plus
//! the imports the thread-safety snippet assumes.
#![cfg(feature = "testing")]
#![allow(unused_mut, unused_variables, unused_imports, clippy::let_and_return)]

use quorum_quest_client::testing::TestServer;

// Kept exactly as that README has them, spacing included.
#[rustfmt::skip]
mod basic {
use std::time::Duration;
use quorum_quest_client::QuorumQuestClient;

pub async fn basic_usage() -> Result<(), Box<dyn std::error::Error>> {
    // Create a client
    let mut client = QuorumQuestClient::new(
        "my-service",                // Service name
        "production",                // Domain
        Duration::from_secs(15),     // TTL
        "http://localhost:5050",     // Server address
        None,                        // Client ID (generated if None)
        None,                        // Callbacks (NoOpCallbacks if None)
    ).await?;
    
    // Try to acquire leadership
    let is_leader = client.try_acquire_lock().await?;
    
    if is_leader {
        println!("This node is now the leader!");
        
        // Start keep-alive to maintain leadership
        client.start_keep_alive().await?;
        
        // Perform leader-specific tasks...
        
    } else {
        println!("Another node is the leader. Running as follower.");
    }
    
    // Check status
    if client.is_leader() {
        if let Some(remaining) = client.get_remaining_lease() {
            println!("Remaining lease time: {:?}", remaining);
        }
    }
    
    // To voluntarily give up leadership:
    if client.is_leader() {
        client.release_lock().await?;
    }
    
    // Always stop the keep-alive process when done
    client.stop_keep_alive().await;
    
    Ok(())
}
}

#[rustfmt::skip]
mod callbacks {
use std::sync::Arc;
use std::time::Duration;
use async_trait::async_trait;
use quorum_quest_client::{QuorumQuestClient, Callbacks};

struct MyCallbacks;

#[async_trait]
impl Callbacks for MyCallbacks {
    async fn on_leader_elected(&self, is_leader: bool) {
        if is_leader {
            println!("Became leader! Starting leader tasks...");
            // Start leader-specific tasks
        } else {
            println!("Another node is leader");
        }
    }
    
    async fn on_leader_lost(&self) {
        println!("Lost leadership! Stopping leader tasks...");
        // Stop leader-specific tasks
    }
}

pub async fn using_callbacks() -> Result<QuorumQuestClient, Box<dyn std::error::Error>> {
// Create client with callbacks
let callbacks = Arc::new(MyCallbacks);
let mut client = QuorumQuestClient::new(
    "my-service",
    "production",
    Duration::from_secs(15),
    "http://localhost:5050",
    None,
    Some(callbacks),
).await?;
Ok(client)
}
}

#[rustfmt::skip]
mod thread_safety {
use std::time::Duration;
use quorum_quest_client::QuorumQuestClient;

pub async fn thread_safety() -> Result<std::sync::Arc<std::sync::Mutex<QuorumQuestClient>>, Box<dyn std::error::Error>> {
use std::sync::{Arc, Mutex};

let client = Arc::new(Mutex::new(
    QuorumQuestClient::new(
        "my-service", 
        "production", 
        Duration::from_secs(15), 
        "http://localhost:5050", 
        None, 
        None
    ).await?
));

// Clone the Arc to share the client between threads
let client_clone = client.clone();
tokio::spawn(async move {
    let mut locked_client = client_clone.lock().unwrap();
    // Use the client...
});
Ok(client)
}
}

use basic::basic_usage;
use callbacks::using_callbacks;
use thread_safety::thread_safety;

/// All snippets share port 5050, so they run in one test, one after another.
///
/// The snippets name `http://localhost:5050` and are kept verbatim, so this
/// test needs that port. When something else holds it (the README's own
/// `server` example, a real server), the test says so and skips instead of
/// failing the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_readme_snippets_work_as_their_comments_say() {
    let server = match TestServer::builder().port(5050).start().await {
        Ok(server) => server,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!(
                "SKIPPED the_original_readme_snippets_work_as_their_comments_say: port 5050 is in use \
                 by another process ({err}). The seed README's snippets connect to \
                 http://localhost:5050 verbatim, so this test must own that port; stop whatever \
                 listens there (e.g. `cargo run --example server`) to run it."
            );
            return;
        }
        Err(err) => panic!("cannot start the test server on port 5050: {err}"),
    };

    // Basic usage: leads, keeps alive, releases, stops. The lock ends up free.
    basic_usage().await.unwrap();
    assert!(
        server.lock("my-service", "production").is_none(),
        "released at the end"
    );

    // Callbacks: a client that can lead; a second one sees the first as leader.
    let leader = using_callbacks().await.unwrap();
    assert!(leader.try_acquire_lock().await.unwrap());
    let follower = using_callbacks().await.unwrap();
    assert!(!follower.try_acquire_lock().await.unwrap());
    leader.release_lock().await.unwrap();
    assert!(follower.try_acquire_lock().await.unwrap());
    follower.release_lock().await.unwrap();

    // Thread safety: the shared client is usable from other tasks.
    let shared = thread_safety().await.unwrap();
    let c = shared.lock().unwrap().clone();
    assert!(c.try_acquire_lock().await.unwrap());
    assert!(shared.lock().unwrap().is_leader());
    c.release_lock().await.unwrap();
    assert!(!shared.lock().unwrap().is_leader());
    server.shutdown().await;
}
