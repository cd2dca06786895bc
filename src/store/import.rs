//! Bringing in a record's Automerge document made elsewhere (`ferry import --format automerge`,
//! the socket's `import_automerge`): the document whole, its history kept, each of its changes
//! queued for upload as it is, under the actor that wrote it.
//!
//! Owns: the checks an imported document passes (a JSON-shaped record with valid fields, no
//! field its collection encrypts, changes that fit a frame, an id this device does not hold)
//! and the one atomic batch that takes it in. Must not touch: which actors the relay logs
//! changes of (`relay::store`), sessions, the network.

use super::feed::{FeedChange, Origin};
use super::kv::Batch;
use super::{Applied, CountDelta, Store, StoreError, keys, validate_fields};
use crate::record::Record;
use ferry_proto::Operation;

impl Store {
    /// Takes in `bytes`, a document made by any Automerge program, as the record
    /// `collection`/`id`, keeping its history: its changes are queued for upload in an order
    /// that applies, and the relay logs them under the actors that wrote them. Refused when the
    /// record exists here (deleted or not), when the document shows anything but JSON, holds a
    /// field the collection encrypts (its history would carry it in the clear) or a change
    /// larger than a frame. Returns the record as written and how many changes it holds.
    /// Durable after `flush`.
    pub fn import_document(
        &self,
        collection: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<(Applied, usize), StoreError> {
        self.options.check_write(collection, Some(id), None)?;
        let exists = || StoreError::Exists {
            collection: collection.to_owned(),
            id: id.to_owned(),
        };
        let key = (collection.to_owned(), id.to_owned());
        let mut cache = self.lock_cache();
        if cache.contains(&key) || self.kv.get(&keys::doc(collection, id))?.is_some() {
            return Err(exists());
        }
        let policy = self.policy(collection);
        let (record, changes) = Record::import(bytes, &self.actor)?;
        let mut record = record.with_text_fields(policy.text.clone());
        let fields = record.fields();
        validate_fields(&fields, &self.options.limits)?;
        if let Some(field) = fields.keys().find(|f| policy.encrypted.contains(*f)) {
            return Err(StoreError::ImportRefused(format!(
                "field `{field}` is encrypted in {collection}, and the document's history holds \
                 it in the clear: import it without that field, then write the field"
            )));
        }
        if let Some(change) = changes
            .iter()
            .find(|c| c.raw_bytes().len() > self.options.max_change_bytes)
        {
            return Err(StoreError::ChangeTooLarge {
                address: format!("{collection}/{id}"),
                len: change.raw_bytes().len(),
                max: self.options.max_change_bytes,
            });
        }
        let now = self.clock.now_ms();
        let mut batch = Batch::default();
        let mut delta = CountDelta::default();
        let deleted = record.is_deleted();
        let view = super::views::of_record(&mut record, policy)?;
        batch.put(keys::doc(collection, id), record.save());
        batch.put(keys::view(collection, id), view);
        let mut queue_id = None;
        for (index, change) in changes.iter().enumerate() {
            let operation = if index == 0 {
                Operation::Create
            } else {
                Operation::Update
            };
            queue_id = Some(self.stage_local_change(
                collection,
                id,
                operation,
                change.raw_bytes().to_vec(),
                now,
                &mut batch,
                &mut delta,
            )?);
        }
        let operation = if deleted {
            Operation::Delete
        } else {
            Operation::Create
        };
        let heads: Vec<String> = record.heads().iter().map(|h| h.to_string()).collect();
        let seq = self.stage_feed(
            &mut batch,
            FeedChange {
                seq: 0,
                collection: collection.to_owned(),
                id: id.to_owned(),
                operation,
                heads: heads.clone(),
                device: self.device_id.clone(),
                origin: Origin::Local,
            },
        )?;
        let mut queue = self.lock_queue();
        self.apply_queue_batch(&mut queue, batch, delta)?;
        drop(queue);
        self.feed_landed(std::iter::once(seq));
        cache.put(key, record);
        Ok((
            Applied {
                collection: collection.to_owned(),
                id: id.to_owned(),
                operation: Some(operation),
                heads,
                queue_id,
                seq: Some(seq),
            },
            changes.len(),
        ))
    }
}
